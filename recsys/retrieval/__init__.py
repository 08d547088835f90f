"""Candidate retrieval: embedding retrieval (faiss), generative retrieval over semantic IDs."""
