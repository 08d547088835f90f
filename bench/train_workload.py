"""The training workloads the speed benches share: real synthetic batches, a preset ranker, one train step.

Shapes (batches come from the real pipeline: ``generate`` -> Parquet -> ``RequestLoader``):

* ``default``: the embedded default dataset (``configs/data/synthetic.yaml``: 3 behaviour kinds,
  median 40 events per user, 16 candidates per request), loader batch 256 requests, max_len 256:
  what ``python -m recsys.train`` trains on.
* ``long``: long histories, one candidate per request (the comparison's long-history case): one
  kind, lognormal median 300 events (sigma 0.6, max 2048), max_len 256, batch 256 requests.

``TrainStep`` is the step of ``recsys/train/loop.py`` (same optimizers, loss, non-finite checks,
grad clipping, ``loss.item()``), without the logging and checkpointing around it.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from recsys.data.config import LoaderConfig, SyntheticConfig
from recsys.data.loader import RequestLoader
from recsys.data.prepare import write_dataset
from recsys.data.synthetic import generate
from recsys.model.config import ModelConfig
from recsys.model.heads import multitask_bce
from recsys.reliability.guards import grads_finite
from recsys.train.config import OptimConfig

try:  # the one trainer's layout
    from recsys.baselines.factory import build_model as _build_model
    from recsys.baselines.factory import max_s_tokens
    from recsys.dist.optim import make_optimizers
except ImportError:  # an arm at a commit before it (bench/train_throughput.py --a-commit)
    from recsys.train.loop import build_model, make_optimizers
else:
    def build_model(schema, cfg: ModelConfig, max_len: int) -> torch.nn.Module:
        """``recsys.train``'s model for histories cut to ``max_len`` events (the older signature)."""
        return _build_model(schema, cfg, max_s_tokens(schema, cfg, max_len))

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("default", "long")


def synthetic_config(shape: str) -> SyntheticConfig:
    """The generator config of a workload shape (see the module docstring)."""
    base = SyntheticConfig()
    if shape == "default":
        return base
    if shape == "long":
        return dataclasses.replace(base, num_users=800, sequences=["click"], kind_rates=[1.0], history_median=300.0,
                                   history_sigma=0.6, max_history=2048, candidates_per_request=1,
                                   requests_per_user=2.0, tasks=["click"])
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def load_batches(shape: str, n_batches: int, split: str = "train", batch_size: int = 256, max_len: int = 256):
    """``(schema, [RequestBatch] * n_batches)``: the first batches of ``split`` (unshuffled, deterministic)."""
    data = generate(synthetic_config(shape))
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp), data.schema, data.columns, data.split, row_group_size=1024, seed=0)
        files = sorted((Path(tmp) / split).glob("*.parquet"))
        batches = []
        for batch in RequestLoader(files, data.schema, LoaderConfig(batch_size=batch_size, max_len=max_len)):
            batches.append(batch)
            if len(batches) == n_batches:
                break
    return data.schema, batches


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["n_layers=2", "pyramid.round_to=32"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"model override {pair!r} is not key=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def model_config(preset: str, overrides: list[str] = ()) -> ModelConfig:
    """``configs/model/<preset>.yaml`` with ``key=value`` overrides -> ``ModelConfig``."""
    raw = yaml.safe_load((REPO / "configs" / "model" / f"{preset}.yaml").read_text())
    for key, value in parse_overrides(list(overrides)).items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return ModelConfig(**raw)


class TrainStep:
    """One optimizer step of ``recsys.train``'s loop on a batch (``bf16``: the loop's autocast)."""

    def __init__(self, schema, cfg: ModelConfig, max_len: int = 256, bf16: bool = False, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = build_model(schema, cfg, max_len)
        oc = OptimConfig(dense_lr=0.004)
        self.clip = oc.clip_grad_norm
        self.opt_sparse, self.opt_dense = make_optimizers(self.model, oc)
        self.dense = [p for g in self.opt_dense.param_groups for p in g["params"]]
        self.params = [p for o in (self.opt_sparse, self.opt_dense) for g in o.param_groups for p in g["params"]]
        self.bf16 = bf16

    def __call__(self, batch) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(batch)
        loss, _ = multitask_bce(logits, batch.labels)
        self.opt_sparse.zero_grad(set_to_none=True)
        self.opt_dense.zero_grad(set_to_none=True)
        value = loss.item()
        loss.backward()
        if not grads_finite(self.params):
            raise FloatingPointError("non-finite gradient in the bench step")
        torch.nn.utils.clip_grad_norm_(self.dense, self.clip)
        self.opt_sparse.step()
        self.opt_dense.step()
        return value
