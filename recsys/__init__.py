"""recsys: recommender ranking engine."""
