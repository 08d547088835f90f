"""Unified tokenizer: behaviour sequences -> S tokens, non-sequential features -> NS tokens."""

from recsys.features.tokenizer import TokenizedBatch, UnifiedTokenizer

__all__ = ["TokenizedBatch", "UnifiedTokenizer"]
