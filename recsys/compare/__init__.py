"""Model comparison (``python -m recsys.compare``): the ranker and the baselines on one dataset, one table."""
