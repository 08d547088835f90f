"""torchrec embedding tables for sequence, candidate and user/context id features."""

from recsys.embeddings.tables import FeatureEmbeddings

__all__ = ["FeatureEmbeddings"]
