"""``python -m recsys.score``: the batch scoring job (see ``recsys/serving/job.py`` and docs/serving.md)."""
