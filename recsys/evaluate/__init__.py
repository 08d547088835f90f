"""Evaluation report of a trained model (``python -m recsys.evaluate``): metrics.json + PNG plots."""

from recsys.evaluate.run import run_evaluation

__all__ = ["run_evaluation"]
