"""Distributed training on torchrec: sharded tables (DistributedModelParallel), data-parallel dense.

``python -m recsys.dist`` / ``torchrun --nproc_per_node N -m recsys.dist dist=gloo ...``;
see docs/distributed.md.
"""
