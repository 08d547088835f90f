"""torchrec's train pipelines drive the ranker on real loader batches (``RequestBatch`` is ``Pipelineable``).

* ``TrainPipelineBase`` (copy of batch i+1 overlapped with step i) gives exactly the eager loop's outputs;
* ``TrainPipelineSparseDist`` on one gloo rank (CPU) rewrites both sharded torchrec modules of the
  tokenizer (their inputs are batch attributes: ``batch.id_features``, ``batch.sparse``), so their
  input all-to-all runs one batch ahead, and the first step's output equals the sharded model's own
  forward on that batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from feature_helpers import SCHEMA, make_ranker, write_requests
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.streamable import Pipelineable

from recsys.data.batch import RequestBatch
from recsys.data.config import LoaderConfig
from recsys.data.loader import RequestLoader


class RankerLoss(nn.Module):
    """What torchrec's pipelines call: ``batch -> (loss, output)``."""

    def __init__(self, ranker: nn.Module) -> None:
        super().__init__()
        self.ranker = ranker

    def forward(self, batch: RequestBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.ranker(batch)
        return nn.functional.binary_cross_entropy_with_logits(logits, batch.labels), logits.detach()


def _loader(tmp_path: Path) -> RequestLoader:
    f = write_requests(tmp_path / "requests.parquet", 44, seed=3)
    return RequestLoader([f], SCHEMA, LoaderConfig(batch_size=8, max_len=6, num_workers=1))


def _drain(pipe, loader: RequestLoader) -> list[torch.Tensor]:
    it, outs = iter(loader), []
    while True:
        try:
            outs.append(pipe.progress(it))
        except StopIteration:
            return outs


def _eager(loader: RequestLoader) -> list[torch.Tensor]:
    model = RankerLoss(make_ranker().train())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    outs = []
    for batch in loader:
        opt.zero_grad()
        loss, out = model(batch)
        loss.backward()
        opt.step()
        outs.append(out)
    return outs


def test_batch_is_pipelineable_and_moves_whole(tmp_path):
    batch = next(iter(_loader(tmp_path)))
    assert isinstance(batch, Pipelineable)
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert moved.sizes is batch.sizes and moved.id_features.keys() == batch.id_features.keys()
    if torch.cuda.is_available():  # a stream to record exists only on an accelerator
        batch.to(torch.device("cuda"), non_blocking=True).record_stream(torch.cuda.current_stream())


def test_train_pipeline_base_equals_eager_loop(tmp_path):
    loader = _loader(tmp_path)
    model = RankerLoss(make_ranker().train())
    pipe = TrainPipelineBase(model, torch.optim.SGD(model.parameters(), lr=0.5), torch.device("cpu"))
    got, want = _drain(pipe, loader), _eager(loader)
    assert len(got) == len(want) == len(loader) > 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_train_pipeline_sparse_dist_pipelines_both_tables(tmp_path):
    loader = _loader(tmp_path)
    first = next(iter(loader))
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}")
    try:
        dmp = DistributedModelParallel(RankerLoss(make_ranker().train()), device=torch.device("cpu"),
                                       sharders=[EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder()])
        with torch.no_grad():
            want = dmp(first)[1]  # the same sharded model, called directly, before any update
        pipe = TrainPipelineSparseDist(dmp, torch.optim.SGD(dmp.parameters(), lr=0.5), torch.device("cpu"))
        outs = _drain(pipe, loader)
        pipelined = sorted(type(m).__name__ for m in pipe._pipelined_modules)
    finally:
        dist.destroy_process_group()
    assert pipelined == ["ShardedEmbeddingBagCollection", "ShardedEmbeddingCollection"]
    assert len(outs) == len(loader)
    torch.testing.assert_close(outs[0], want, rtol=1e-6, atol=1e-6)
    assert all(torch.isfinite(o).all() for o in outs)
