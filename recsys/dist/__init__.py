"""The distributed pieces of training: sharded tables (torchrec DistributedModelParallel), fused sparse
optimizer, data-parallel dense, DCP checkpoints, rank-0 decisions (``recsys.dist.strategy``).

The loop is ``recsys.train``'s: ``torchrun --nproc_per_node N -m recsys.train dist=gloo ...``
(``-m recsys.dist`` is an alias); see docs/distributed.md.
"""
