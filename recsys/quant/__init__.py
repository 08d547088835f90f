"""Semantic-ID quantization: item content vectors -> RQ-KMeans / RQ-VAE / multi-expert codes,
unique per item, with a report; ``SemanticIds`` is what the ranker and checkpoints carry."""

from recsys.quant.artifact import SemanticIds

__all__ = ["SemanticIds"]
