"""The run directory of ``recsys.train`` (one process or N ranks): what it reads, what it writes, and the
resume decision.

``output_dir`` is refused when it overlaps the data (``recsys.reliability.rundir``) and locked for the run's
lifetime (under N ranks by rank 0, which also takes the resume decision for all); ``train.resume=false``
into a directory holding checkpoints is refused (``train.fresh_run=true`` moves the earlier outputs aside),
and a resume refuses a checkpoint whose run configuration (:func:`recsys.train.config.run_identity`)
differs from this run's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from recsys.data.config import DataSource
from recsys.data.prepare import raw_inputs
from recsys.dist.strategy import DIST_CHECKPOINT_DIR, RESUME_KEYS
from recsys.errors import InputError
from recsys.reliability.rundir import lock_run_dir, move_aside
from recsys.retrieval.two_tower_model import ARTIFACT_DIR as RETRIEVER_DIR
from recsys.train.config import RunConfig, identity_differences, run_fingerprint
from recsys.train.early_stopping import BestWeights
from recsys.train.tensorboard import TENSORBOARD_DIR


def plain_config(cfg: RunConfig) -> dict[str, Any]:
    """The run config as plain JSON types, enums by *value* (what YAML and overrides use)."""
    return json.loads(json.dumps(asdict(cfg)))  # str-valued enums serialise as their values


def config_record(cfg: RunConfig) -> dict[str, Any]:
    """``config`` and its ``config_fingerprint``, as every checkpoint stores them (single-process and
    distributed): what :func:`check_same_run` compares a resume against."""
    config = plain_config(cfg)
    return {"config": config, "config_fingerprint": run_fingerprint(config)}


# What a run writes into output_dir (besides the lock file), single-process or distributed: moved aside
# together by train.fresh_run.
RUN_OUTPUTS = ("checkpoints", DIST_CHECKPOINT_DIR, "train_log.jsonl", TENSORBOARD_DIR, "report.json",
               BestWeights.FILE, RETRIEVER_DIR)


class CheckpointStore(Protocol):
    """A directory of checkpoints (``CheckpointManager``, ``recsys.dist``'s ``DistCheckpointer``)."""

    dir: Path

    def paths(self) -> list[Path]: ...

    def load_latest(self, required: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]] | None: ...


def train_inputs(cfg: RunConfig) -> list[tuple[str, str | None]]:
    """What the run reads, as ``(config key, path)``: ``output_dir`` must overlap none of them."""
    d = cfg.data
    named: list[tuple[str, str | None]] = ([("data.path", d.path)] if d.source == DataSource.parquet
                                           else [("data.root", d.root)])
    named += raw_inputs(d)  # ml-100k raw dir; your own log, its side tables, the dataset whose maps it uses
    named.append(("model.item_embedding.sid_path", cfg.model.item_embedding.sid_path))
    return named


def check_same_run(path: Path, state: dict[str, Any], cfg: RunConfig) -> None:
    """Refuse to resume from a checkpoint of another run configuration, naming every differing key.

    The checkpoint's ``config_fingerprint`` (digest of ``run_identity``) equal to this run's: same run.
    Otherwise (a different digest, or a checkpoint written before fingerprints existed) the stored
    config is compared key by key; keys only one side knows are not compared.
    """
    stored = state.get("config")
    if isinstance(stored, str):  # older recsys.dist checkpoints stored it as JSON text
        try:
            stored = json.loads(stored)
        except json.JSONDecodeError:
            stored = None
    if not isinstance(stored, dict):
        raise InputError(f"checkpoint {path} records no run configuration, so resuming could continue another "
                         "run: use another output_dir, or train.fresh_run=true (moves it aside)")
    current = plain_config(cfg)
    if state.get("config_fingerprint") == run_fingerprint(current):
        return
    diffs = identity_differences(stored, current)
    if diffs:
        raise InputError(
            f"checkpoint {path} is of another run configuration ({len(diffs)} setting(s) differ: "
            f"{'; '.join(diffs[:10])}{' ...' if len(diffs) > 10 else ''}); resuming would continue that run "
            f"under other settings. Rerun with the checkpoint's settings, use another output_dir, or set "
            f"train.fresh_run=true (moves the earlier run into {path.parent.parent}/previous-<time>/)")
    if "config_fingerprint" not in state:
        print(f"[train] {path} has no config fingerprint (older version): its stored config matches key by key")


def _listing(stores: Sequence[CheckpointStore]) -> str:
    """``step_3.pt, step_6.pt in <dir>`` per store holding checkpoints (the newest five of each)."""
    return "; ".join(f"{', '.join(p.name for p in found[-5:])} in {s.dir}" for s in stores if (found := s.paths()))


def open_run(cfg: RunConfig, out_dir: Path, ckpts: CheckpointStore, required: tuple[str, ...] = RESUME_KEYS,
             others: Sequence[CheckpointStore] = ()) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from (checked against this run's config), or None for a fresh start.

    ``ckpts``: the store a resume loads from (``required``: the keys it needs); ``others``: stores whose
    checkpoints count as this directory's too (``recsys.dist``: the model-only ``checkpoints/``).
    ``train.fresh_run``: earlier outputs are moved aside, fresh start. ``train.resume=false`` into a
    directory that holds checkpoints, or a resume where none of them loads: refused (a new run would be
    pruned against, and scored as, the old checkpoints). No checkpoint at all: fresh start. One policy for
    ``recsys.train`` and ``recsys.dist`` (there, rank 0 calls it and every rank gets its outcome).
    """
    tc = cfg.train
    stores = [ckpts, *others]
    if tc.fresh_run:
        moved = move_aside(out_dir, RUN_OUTPUTS)
        if moved is not None:
            print(f"[train] fresh run: the earlier outputs of {out_dir} were moved to {moved}")
        return None
    if not tc.resume:
        if existing := _listing(stores):
            raise InputError(
                f"output_dir={out_dir} already holds checkpoints ({existing}) and train.resume=false: a new "
                "run there would mix with them (retention and recsys.score pick the highest step). Resume "
                "(train.resume=true), start a fresh run there (train.fresh_run=true moves the earlier outputs to "
                "previous-<time>/), or use another output_dir")
        return None
    found = ckpts.load_latest(required=required)
    if found is not None:
        check_same_run(*found, cfg)
    elif existing := _listing(stores):  # every one was reported and skipped: do not start a run over them
        raise InputError(
            f"output_dir={out_dir} holds checkpoints but none can be resumed ({existing}, each reported above); "
            "a new run there would mix with them. Remove or replace them, start a fresh run there "
            "(train.fresh_run=true moves them to previous-<time>/), or use another output_dir")
    return found


def claim_run_dir(cfg: RunConfig, par: Any, held: ExitStack) -> tuple[str, dict[str, Any]] | None:
    """Lock ``output_dir`` (released by ``held``), then take the resume decision (:func:`open_run`) over the
    strategy's checkpoints (``par``: ``recsys.dist.strategy``); returns ``(checkpoint path, trainer state)``
    or None. Under N ranks rank 0 calls it and every rank gets its outcome: the model-only
    ``checkpoints/step_<N>.pt`` count as the directory's checkpoints too (``resume=false`` over them is
    refused), but a resume loads only DCP checkpoints."""
    out_dir = Path(cfg.output_dir)
    held.enter_context(lock_run_dir(out_dir))
    store = par.store(out_dir, cfg.train.keep_checkpoints)
    found = open_run(cfg, out_dir, store, par.resume_keys, par.other_stores(out_dir))
    return None if found is None else (str(found[0]), found[1])
