"""Structured configs of `python -m recsys.train` (registered in Hydra's ConfigStore).

Unknown keys fail at start-up: every group YAML is merged into these typed nodes (and a key added
with ``+key=value`` is refused by the entry point, see ``recsys.reliability.strict_config``).

:func:`run_identity` is the part of a run's config that a resumed run must share with its
checkpoint (everything that changes the trained weights), :func:`run_fingerprint` its digest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore

from recsys.data.config import DataConfig
from recsys.dist.config import DistConfig, OptimConfig
from recsys.errors import InputError
from recsys.model.config import ModelConfig
from recsys.reliability.device import Device
from recsys.reliability.digest import json_digest


class ListedLabel(str, Enum):
    """Labels of a request's listed candidates when hard negatives are added."""

    keep = "keep"
    """As read (impression logs: clicked and unclicked impressions, negatives beside them)."""
    positive = "positive"
    """1 on every task: the listed item is what the user took next (leave-one-out next-item data such as
    ml-100k, where the ranker then learns the next item against the retriever's near misses)."""


class RankingLoss(str, Enum):
    """The ranker's loss over its task logits (a model with its own loss, a retriever, ignores it: refused)."""

    bce = "bce"
    """Pointwise: the mean per-candidate BCE of every task."""
    listwise = "listwise"
    """Softmax cross-entropy over each request's candidates, per task (``recsys.model.heads.multitask_listwise``):
    the ranker learns the order the cascade asks of it, e.g. the next item against hard negatives."""


@dataclass
class HardNegativesConfig:
    """Negatives from a retriever's top K appended to every training request (``recsys/train/hard_negatives.py``)."""

    retriever: str | None = None
    """A retriever artifact directory trained on the same dataset (``<two-tower run>/retriever``); None = off."""
    retrieve_k: int = 100
    """Top K the negatives are drawn from (the cascade's ``retrieve_k``: the ranker then trains on the
    candidate set it will re-rank)."""
    num: int = 4
    """Negatives per request, drawn uniformly without replacement from the top K minus the listed items."""
    listed_label: ListedLabel = ListedLabel.keep
    """keep | positive (see :class:`ListedLabel`); negatives are 0 on every task."""
    exclude_user_positives: bool = True
    """Never draw an item the same user has a positive for at or after the request in the train split (its
    later items: the retriever, trained on every position, ranks them high; as negatives they are false
    ones). Items of the user's history stay eligible ("not again" is a true negative)."""
    retrieved_only: bool = False
    """Draw negatives only for a request whose listed items the retriever's top K holds (one at least); any
    other request keeps its listed candidates alone. The ranker then learns to order what the retriever
    found, which is all a cascade asks of it; a request whose next item was not retrieved teaches the
    residual ranker (``prior``) to push the retriever's top items down. Needs ``train.loss=listwise`` (a
    lone candidate adds no listwise loss; under BCE it would teach "everything is positive")."""
    history_first: bool = False
    """Draw the top K's items that are in the request's own history first (uniformly among them), then the
    others: the ranker is taught "not one of my history items", which a retriever ranks high and which a
    user of a log such as ml-100k never takes again."""
    prior: bool = False
    """Train the ranker as a residual over the retriever: every candidate's two-tower score ``u . v`` is
    added to each task's logit (training, validation, test) and the checkpoint records the retriever, so
    the cascade adds it when serving; such a ranker is served by ``mode=cascade`` only."""

    def __post_init__(self) -> None:
        self.listed_label = ListedLabel(self.listed_label)
        if self.num < 1 or self.retrieve_k < self.num:
            raise InputError(f"train.hard_negatives needs 1 <= num <= retrieve_k, got num={self.num}, "
                             f"retrieve_k={self.retrieve_k}")
        if self.prior and self.retriever is None:
            raise InputError("train.hard_negatives.prior=true needs train.hard_negatives.retriever (the two-tower "
                             "whose score the ranker is trained on top of)")


class StopMode(str, Enum):
    max = "max"
    """Higher is better (AUC, recall)."""
    min = "min"
    """Lower is better (log loss)."""


@dataclass
class EarlyStoppingConfig:
    """Stop when a validation metric stops improving (``recsys/train/early_stopping.py``)."""

    metric: str | None = None
    """A key of the validation record (``valid_auc``, ``valid_logloss``, a retriever's ``valid_recall@10``);
    None = off. Needs ``train.eval_every > 0``."""
    patience: int = 3
    """Validations in a row without a strict improvement before training stops."""
    mode: StopMode = StopMode.max
    """max | min."""
    restore_best: bool = True
    """When training ends (stopped early or not), put back the weights of the best validation (kept in
    ``<output_dir>/best_weights.pt``, written at every new best); the optimizer state stays the last step's.
    One process only. False: the last step's weights are the result."""

    def __post_init__(self) -> None:
        self.mode = StopMode(self.mode)
        if self.patience < 1:
            raise InputError(f"train.early_stopping.patience must be >= 1, got {self.patience}")


@dataclass
class TrainConfig:
    seed: int = 0
    """Seeds torch and Python RNGs (data order is seeded by data.loader.seed)."""
    epochs: int = 1
    """Passes over the train split."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    eval_every: int = 0
    """Validate every N steps (0 = only after training)."""
    eval_max_batches: int = 0
    """Cap on validation batches per evaluation (0 = whole split)."""
    log_every: int = 20
    """Steps between metric lines in train_log.jsonl."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    resume: bool = True
    """Continue from the newest valid checkpoint in the output dir, if any (its run configuration must
    match, see :func:`run_identity`). False into a directory that holds checkpoints is refused."""
    fresh_run: bool = False
    """Start a new run in an output dir that holds an earlier one: its checkpoints, train_log.jsonl,
    tensorboard/ and report.json are moved (never deleted) into ``<output_dir>/previous-<timestamp>/``; no resume."""
    bf16: bool = False
    """bf16 autocast for forward/backward (parameters and optimizer stay fp32)."""
    device: Device = Device.auto
    """auto = cuda when available."""
    task_weights: list[float] = field(default_factory=list)
    """Loss weight per task (empty = all 1)."""
    loss: RankingLoss = RankingLoss.bce
    """bce | listwise (see :class:`RankingLoss`)."""
    progress: bool = True
    """tqdm progress bar."""
    tensorboard: bool = True
    """TensorBoard scalars of every train_log.jsonl record under ``<output_dir>/tensorboard/``
    (``recsys/train/tensorboard.py``); false = none."""
    max_consecutive_nonfinite: int = 10
    """Steps with a NaN/Inf loss or gradient are skipped (no update) and counted; one more than this
    many in a row stops training with FloatingPointError (0 = stop at the first)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizers."""
    hard_negatives: HardNegativesConfig = field(default_factory=HardNegativesConfig)
    """Retrieved negatives for a cascade's ranker (off unless ``hard_negatives.retriever`` is set)."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Stop on a validation metric's plateau (off unless ``early_stopping.metric`` is set)."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InputError(f"train.epochs must be >= 1, got {self.epochs}")
        for n in ("max_steps", "eval_every", "eval_max_batches", "checkpoint_every", "max_consecutive_nonfinite"):
            if getattr(self, n) < 0:
                raise InputError(f"train.{n} must be >= 0, got {getattr(self, n)}")
        self.device = Device(self.device)
        self.loss = RankingLoss(self.loss)
        if self.keep_checkpoints < 1:
            raise InputError(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.hard_negatives.retrieved_only and self.loss != RankingLoss.listwise:
            raise InputError("train.hard_negatives.retrieved_only=true needs train.loss=listwise (the requests "
                             "without negatives would train BCE on positives alone)")
        if self.early_stopping.metric is not None and self.eval_every == 0:
            raise InputError("train.early_stopping.metric needs train.eval_every > 0 (the validations it watches)")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    """Distributed training (``dist=gloo|nccl`` under torchrun; recsys/dist/, docs/distributed.md)."""
    output_dir: str = "runs/train/latest"
    """Where checkpoints, train_log.jsonl and report.json go."""


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=RunConfig)


# Settings that do not change what a run computes, only where it lives, how long it runs, how it logs
# or on what hardware: a resume may change them. Every other key of the run config (data, model, seed,
# optimizers, batch size, max_len...) must equal the checkpoint's. ``train.epochs`` / ``max_steps`` are
# here so that a finished run can be extended (with lr_decay=cosine the schedule then stretches).
RESUME_NEUTRAL_KEYS = (
    "output_dir", "dist",
    "data.root", "data.loader.num_workers", "data.ml100k.raw_dir", "data.ml100k.download",
    "model.attention_backend",
    "train.epochs", "train.max_steps", "train.eval_every", "train.eval_max_batches", "train.log_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.resume", "train.fresh_run", "train.progress",
    "train.tensorboard", "train.device", "train.max_consecutive_nonfinite", "train.early_stopping",
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_identity(plain: dict[str, Any]) -> dict[str, Any]:
    """``{dotted key: value}`` of a plain run config (``loop.plain_config``) without the resume-neutral keys."""
    return {k: v for k, v in _flatten(plain).items()
            if not any(k == n or k.startswith(n + ".") for n in RESUME_NEUTRAL_KEYS)}


def run_fingerprint(plain: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over :func:`run_identity` (stored in checkpoints as ``config_fingerprint``)."""
    return json_digest(run_identity(plain))


def identity_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: checkpoint <a> != now <b>"`` for every identity key both configs hold with different values.

    A key only one side holds (added to or removed from the config schema since the checkpoint was
    written) is not compared: the checkpoint cannot say what it was.
    """
    a, b = run_identity(stored), run_identity(current)
    return [f"{k}: checkpoint {a[k]!r} != now {b[k]!r}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
