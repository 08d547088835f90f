"""The batch scoring job behind ``python -m recsys.score``: checkpoint + request files -> scored partitions.

Steps: load the ranker from a checkpoint; list the inputs (the checkpoint's dataset split by
default); plan deterministic partitions (``recsys.serving.partitions``); for every partition not
already on disk: read its rows (validated, collated and truncated exactly like the training
loader: ``validate_table`` + ``collate``), score them batch by batch with the cached scorer,
write the partition atomically; finally compute the metrics over *all* partitions on disk and
write ``summary.json``.

Rows are read by partition-aligned row ranges rather than through ``RequestLoader`` (which
deals row groups to ranks/workers): a partition must be the same rows in every run.

Outputs speak the ids of the user's catalog too: when the scored rows' dataset has id maps
(``recsys.data.id_maps``: ingested event logs, ml-100k), every partition carries ``raw_user_id`` and
``raw_item_id`` next to ``user_id`` / ``item_id`` (null for the unknown id 0); synthetic data has no
raw ids. ``inputs_eventlog`` scores a new log of the checkpoint's catalog, encoded with the stored maps
of the checkpoint's dataset (``data.eventlog.id_maps_from``; unknown ids by ``oov_policy``, counted).

Before the output directory is created or written, the job checks that it overlaps none of its
inputs (request files, dataset, checkpoint; ``recsys.reliability.rundir``) and that ``max_len``
is the trained one; the directory is then locked for the job's lifetime.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from kernels.backend import AttentionBackend
from recsys.data.batch import RequestBatch
from recsys.data.collate import collate
from recsys.data.config import DataSource
from recsys.data.eventlog import new_log_config
from recsys.data.id_maps import IdMaps, with_raw_ids
from recsys.data.prepare import PreparedDataset, as_data_config, prepare_dataset
from recsys.data.schema import DataSchema
from recsys.data.validate import validate_table
from recsys.errors import InputError
from recsys.longseq.cache import LongMemoryCache
from recsys.model.config import Backend, ModelConfig
from recsys.model.metrics import auc, gauc, hr_ndcg_at_k, logloss
from recsys.model.ranker import OneTransRanker
from recsys.reliability.atomic import atomic_write_bytes
from recsys.reliability.checkpoint import CheckpointManager, load_checkpoint, load_model_state, require_keys
from recsys.reliability.device import resolve_device
from recsys.reliability.digest import json_default
from recsys.reliability.rundir import check_output_dir, lock_run_dir
from recsys.serving.cache import UserKVCache
from recsys.serving.catalog import (
    catalog_items,
    collect_item_categories,
    score_catalog,
    target_ranks,
    top_k,
)
from recsys.serving.config import CatalogTarget, ScoreConfig, ScoreMode
from recsys.serving.partitions import (
    PART_PREFIX,
    Partition,
    finished,
    plan_partitions,
    prepare_output,
    write_partition,
)
from recsys.serving.scorer import CachedScorer


# ---------------------------------------------------------------------------------------------- loading
def resolve_checkpoint(path: str | Path) -> Path:
    """A ``step_<N>.pt`` file as is; a directory -> its newest ``step_<N>.pt`` (or ``checkpoints/``'s).

    The newest by step number, with no fall-back: if that file does not load, scoring fails naming it
    rather than silently scoring an older model.
    """
    p = Path(path)
    if p.is_file():
        return p.resolve()
    for d in (p / "checkpoints", p):
        found = CheckpointManager(d).paths()
        if found:
            return found[-1].resolve()
    raise InputError(f"checkpoint={path}: no such file, and no step_<N>.pt under {p} or {p / 'checkpoints'}")


SCORING_KEYS = ("model", "schema", "config", "max_s_tokens")


def load_ranker(path: Path, device: torch.device, backend: str | None = None, item_content: str | None = None
                ) -> tuple[OneTransRanker, DataSchema, dict[str, Any]]:
    """(model in eval mode on ``device``, its data schema, the checkpoint's plain config dict plus
    ``dataset_dir``: the prepared dataset it was trained on, None for checkpoints that do not record it).

    ``item_content``: a Parquet (item_id, vector); its items without a SID get one from the
    checkpoint's quantizer (SID models only), so items unseen in training are scored by their SID.
    """
    state = load_checkpoint(path)
    require_keys(state, SCORING_KEYS, path, "be scored")
    schema = DataSchema.from_json(state["schema"])
    config = {**state["config"], "dataset_dir": state.get("dataset_dir")}
    # Through a structured merge, not ModelConfig(**d): it type-checks every key (config enums have
    # lower-case names equal to their values, which is what checkpoints store).
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), config["model"])
    if model_cfg.arch != "onetrans":  # the KV-cached scorer needs the ranker's two-stage structure
        raise InputError(f"{path} holds a {model_cfg.arch.value!r} baseline; recsys.score serves the OneTrans "
                         "ranker only (evaluate baselines with python -m recsys.evaluate)")
    if backend is not None:
        model_cfg.attention_backend = Backend(backend)
    model = OneTransRanker(schema, OmegaConf.to_object(model_cfg), int(state["max_s_tokens"]))
    load_model_state(model, state["model"], str(path))
    if item_content:
        if "item_sid" not in state:
            raise InputError(f"item_content given but checkpoint {path} has no semantic IDs "
                             "(trained with model.item_embedding.mode=id)")
        from recsys.quant.ranker import add_new_items
        add_new_items(model, state["item_sid"], item_content, schema.num_items)
    return model.to(device).eval(), schema, config


def expand_files(paths: list[str]) -> list[Path]:
    """Files as given; directories -> their ``*.parquet`` (sorted)."""
    out: list[Path] = []
    for s in paths:
        p = Path(s)
        if p.is_dir():
            out += sorted(p.glob("*.parquet"))
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"input {p} does not exist")
    return [p.resolve() for p in out]


@dataclass
class ScoreInputs:
    """What a job scores, and the id maps that turn its dense ids back into raw ones."""

    files: list[Path]
    """Request-row files to score."""
    dataset_files: list[Path]
    """Every file of the checkpoint's dataset when the inputs come from it (catalog categories), else []."""
    dataset_dirs: list[Path]
    """Dataset directories read (the checkpoint's; with ``inputs_eventlog`` also the new log's)."""
    id_maps: IdMaps | None = None
    """Raw <-> dense maps of the scored rows (None: synthetic data, or files of no single dataset)."""
    eventlog: dict[str, Any] | None = None
    """``inputs_eventlog``: the log, its dataset, the OOV policy and what it did (summary.json)."""


def resolve_inputs(cfg: ScoreConfig, ckpt_config: dict[str, Any]) -> ScoreInputs:
    """The files to score: ``inputs``, a new log (``inputs_eventlog``) encoded with the maps of the
    checkpoint's dataset, or split ``split`` of that dataset."""
    if cfg.inputs:
        files = expand_files(cfg.inputs)
        return ScoreInputs(files, [], [], inputs_id_maps(files))
    ds = trained_dataset(ckpt_config)
    dataset_files = [p.resolve() for fs in ds.splits.values() for p in fs]
    if cfg.inputs_eventlog:
        new_cfg = new_log_config(ckpt_config["data"], ds.path, cfg.inputs_eventlog, cfg.oov_policy)
        new = prepare_dataset(new_cfg, progress=False, need=("test",))  # every request of a new log is a test row
        info = {"events": cfg.inputs_eventlog, "dataset": str(new.path), "id_maps_from": str(ds.path),
                "oov_policy": new_cfg.oov_policy.value, **{k: new.summary[k] for k in INGEST_COUNTERS
                                                           if k in new.summary}}
        return ScoreInputs([p.resolve() for p in new.splits["test"]], dataset_files, [ds.path, new.path],
                           IdMaps.read(new.path), info)
    if cfg.split not in ds.splits:
        raise InputError(f"split={cfg.split!r} is not a split of the checkpoint's dataset {sorted(ds.splits)}")
    files = [p.resolve() for p in ds.splits[cfg.split]]
    return ScoreInputs(files, dataset_files, [ds.path], IdMaps.read(ds.path))


def trained_dataset(ckpt_config: dict[str, Any]) -> PreparedDataset:
    """The dataset the checkpoint was trained on: the directory the checkpoint recorded (``dataset_dir``),
    opened as it is (no log is hashed or read again, so the run's log may have changed or moved since),
    else the one its data config names. An event log is never ingested again here: the checkpoint's ids
    are those of the dataset it was trained on."""
    data = ckpt_config["data"]
    recorded = ckpt_config.get("dataset_dir")
    if recorded and (Path(recorded) / "schema.json").is_file():
        opened = {"source": "parquet", "path": recorded, "oov_policy": data.get("oov_policy", "error"),
                  "loader": data.get("loader", {})}
        return prepare_dataset(as_data_config(OmegaConf.create(opened)), progress=False)
    trained = as_data_config(OmegaConf.create(data))
    return prepare_dataset(trained, progress=False, build=trained.source != DataSource.eventlog)


INGEST_COUNTERS = ("new_users", "unknown_items", "unknown_item_rows", "unknown_actions", "unknown_action_rows",
                   "duplicate_events_dropped", "user_ids_normalized", "item_ids_normalized", "timestamp_unit")
"""What ingesting ``inputs_eventlog`` did, copied into the scoring summary."""


def inputs_id_maps(files: list[Path]) -> IdMaps | None:
    """The id maps of the dataset directory holding every input file (``<dir>/<split>/*.parquet`` with
    ``<dir>/id_maps/``), or None when the files are of no single dataset with maps."""
    dirs = {f.parent.parent for f in files}
    return IdMaps.read(dirs.pop()) if len(dirs) == 1 else None


def job_inputs(cfg: ScoreConfig, ckpt: Path, dataset_dirs: list[Path]) -> list[tuple[str, str | Path | None]]:
    """Everything the job reads, as ``(key, path)``: the output dir must overlap none of them."""
    named: list[tuple[str, str | Path | None]] = [("checkpoint", ckpt), *(("dataset", d) for d in dataset_dirs),
                                                  ("item_content", cfg.item_content),
                                                  ("inputs_eventlog", cfg.inputs_eventlog)]
    named += [("inputs", f) for f in cfg.inputs]
    if cfg.mode == ScoreMode.catalog:
        named += [("catalog.items_file", cfg.catalog.items_file)]
        named += [("catalog.category_files", f) for f in cfg.catalog.category_files]
    return named


def scoring_max_len(cfg: ScoreConfig, ckpt_config: dict[str, Any], ckpt: Path) -> int:
    """The trained ``data.loader.max_len``, or ``cfg.max_len`` when it equals it or is an allowed lower value."""
    trained = int(ckpt_config["data"]["loader"]["max_len"])
    if cfg.max_len is None or cfg.max_len == trained:
        return trained
    if cfg.max_len > trained:
        raise InputError(f"max_len={cfg.max_len} is above the trained data.loader.max_len={trained} of {ckpt}: the "
                         "model's pyramid was sized for the trained length; drop max_len to use the trained value")
    if not cfg.allow_max_len_change:
        raise InputError(f"max_len={cfg.max_len} differs from the trained data.loader.max_len={trained} of {ckpt}: "
                         "scores would silently differ from training's truncation; drop max_len to use the trained "
                         "value, or set allow_max_len_change=true to score shorter histories on purpose")
    return cfg.max_len


class PartitionReader:
    """Validated rows of a partition (keeps the last row group read: partitions of one row group are adjacent)."""

    def __init__(self, schema: DataSchema) -> None:
        self.schema = schema
        self.columns = [f.name for f in schema.arrow_schema()]
        self._key: tuple[str, int] | None = None
        self._table: pa.Table | None = None

    def read(self, part: Partition) -> pa.Table:
        if self._key != (part.file, part.row_group):
            pf = pq.ParquetFile(part.file)
            present = [c for c in self.columns if c in pf.schema_arrow.names]
            self._table = validate_table(pf.read_row_group(part.row_group, columns=present), self.schema, part.file,
                                         part.row_group)
            self._key = (part.file, part.row_group)
        return self._table.slice(part.start, part.num_rows)


# ---------------------------------------------------------------------------------------------- scoring
def _sigmoid(x: torch.Tensor) -> np.ndarray:
    return torch.sigmoid(x.float()).cpu().numpy().astype(np.float32)


def candidate_rows(batch: RequestBatch, logits: torch.Tensor, tasks: list[str]) -> dict[str, np.ndarray]:
    """Output columns of one batch in candidates mode (one row per candidate, input order)."""
    c = (batch.cand_offsets[1:] - batch.cand_offsets[:-1]).cpu()
    cols = {"request_id": torch.repeat_interleave(batch.request_id.cpu(), c).numpy(),
            "user_id": torch.repeat_interleave(batch.user_id.cpu(), c).numpy(),
            "item_id": batch.cand["item_id"].values().cpu().numpy().astype(np.int64)}
    for t, task in enumerate(tasks):
        cols[f"score_{task}"] = _sigmoid(logits[:, t])
    for t, task in enumerate(tasks):
        cols[f"label_{task}"] = batch.labels[:, t].cpu().numpy().astype(np.float32)
    return cols


class CatalogRanker:
    """Catalog mode for one batch: scores, top-K rows and target rows (see ``recsys.serving.catalog``)."""

    def __init__(self, scorer: CachedScorer, items: np.ndarray, cats: np.ndarray, cfg: ScoreConfig,
                 num_items: int, device: torch.device) -> None:
        self.scorer, self.cfg = scorer, cfg.catalog
        self.tasks = list(scorer.model.tasks)
        task = self.cfg.rank_task or self.tasks[0]
        if task not in self.tasks:
            raise ValueError(f"catalog.rank_task {task!r} not among the model's tasks {self.tasks}")
        self.rank_t = self.tasks.index(task)
        self.items = torch.as_tensor(items, device=device)
        self.cats = torch.as_tensor(cats, device=device)
        self.position = np.full(num_items, -1, dtype=np.int64)  # item id -> catalog position
        self.position[items] = np.arange(len(items))

    def rows(self, batch: RequestBatch, kinds: list[str]) -> dict[str, np.ndarray]:
        logits = score_catalog(self.scorer, batch, self.items, self.cats)  # [B, M, T]
        rank_scores = logits[:, :, self.rank_t].clone()
        items_np = self.items.cpu().numpy()
        cand = batch.cand["item_id"].values().cpu().numpy()
        labels = batch.labels[:, self.rank_t].cpu().numpy()
        co = batch.cand_offsets.cpu().tolist()
        seq = batch.seq.to_dict()
        hist_off = {k: np.concatenate([[0], np.cumsum(seq[f"{k}.item_id"].lengths().cpu().numpy())]) for k in kinds}
        hist_items = {k: seq[f"{k}.item_id"].values().cpu().numpy() for k in kinds}
        out: dict[str, list] = {k: [] for k in ("request_id", "user_id", "item_id", "rank", "is_target")}
        scores_out: list[np.ndarray] = []
        rid, uid = batch.request_id.cpu().numpy(), batch.user_id.cpu().numpy()
        for b in range(batch.num_requests):
            listed = cand[co[b]:co[b + 1]]
            if self.cfg.target == CatalogTarget.positives:
                listed = listed[labels[co[b]:co[b + 1]] > 0.5]
            targets = np.unique(listed)
            pos = self.position[targets]
            inside = targets[pos >= 0]
            if self.cfg.exclude_history:
                seen = np.unique(np.concatenate([hist_items[k][hist_off[k][b]:hist_off[k][b + 1]] for k in kinds]))
                seen_pos = self.position[seen[(seen >= 0) & (seen < len(self.position))]]
                seen_pos = seen_pos[(seen_pos >= 0) & ~np.isin(seen_pos, pos)]
                rank_scores[b, torch.as_tensor(seen_pos, device=rank_scores.device)] = float("-inf")
            top = top_k(rank_scores[b], self.cfg.top_k).cpu().numpy()
            t_pos = torch.as_tensor(pos[pos >= 0], device=rank_scores.device)
            ranks = target_ranks(rank_scores[b], t_pos).cpu().numpy() if len(t_pos) else np.zeros(0, np.int64)
            top_items = items_np[top]
            extra = ~np.isin(inside, top_items)  # targets outside the top-K get their own row
            rows_items = np.concatenate([top_items, inside[extra], targets[pos < 0]])
            rows_rank = np.concatenate([np.arange(len(top)), ranks[extra], np.full(int((pos < 0).sum()), -1)])
            rows_pos = np.concatenate([top, pos[pos >= 0][extra], np.full(int((pos < 0).sum()), -1)])
            n = len(rows_items)
            out["request_id"].append(np.full(n, rid[b]))
            out["user_id"].append(np.full(n, uid[b]))
            out["item_id"].append(rows_items)
            out["rank"].append(rows_rank)
            out["is_target"].append(np.isin(rows_items, targets))
            sc = np.full((n, len(self.tasks)), np.nan, dtype=np.float32)
            ok = rows_pos >= 0
            sc[ok] = _sigmoid(logits[b, torch.as_tensor(rows_pos[ok], device=logits.device)])
            scores_out.append(sc)
        cols = {k: np.concatenate(v).astype(bool if k == "is_target" else np.int64) for k, v in out.items()}
        sc = np.concatenate(scores_out)
        for t, task in enumerate(self.tasks):
            cols[f"score_{task}"] = sc[:, t]
        return cols


# ---------------------------------------------------------------------------------------------- metrics
def summary_metrics(output_dir: Path, cfg: ScoreConfig, tasks: list[str]) -> dict[str, Any]:
    """Metrics over every partition on disk (so a resumed run reports the whole output)."""
    files = sorted(output_dir.glob(f"{PART_PREFIX}*.parquet"))
    if not files:
        return {}
    df = pl.read_parquet(files)
    out: dict[str, Any] = {"output_rows": df.height}
    if cfg.mode == ScoreMode.catalog:
        targets = df.filter(pl.col("is_target"))
        inside = targets.filter(pl.col("rank") >= 0)
        k = cfg.catalog.k
        hr, ndcg = hr_ndcg_at_k(inside["rank"].to_numpy(), k)
        out.update({f"hr@{k}": hr, f"ndcg@{k}": ndcg, "targets": inside.height,
                    "targets_outside_candidate_set": targets.height - inside.height,
                    "requests_ranked": df["request_id"].n_unique()})
        return _finite(out)
    users = df["user_id"].to_numpy()
    for task in tasks:
        p, y = df[f"score_{task}"].to_numpy(), df[f"label_{task}"].to_numpy()
        g, n_users = gauc(p, y, users)
        out.update({f"{task}_auc": auc(p, y), f"{task}_gauc": g, f"{task}_gauc_users": n_users,
                    f"{task}_logloss": logloss(p, y)})
    first = tasks[0]
    out.update({"auc": out[f"{first}_auc"], "gauc": out[f"{first}_gauc"], "logloss": out[f"{first}_logloss"]})
    return _finite(out)


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# ---------------------------------------------------------------------------------------------- the job
def checkpoint_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def run_scoring(cfg: ScoreConfig) -> Path:
    """Run (or resume) the job; returns the path of ``summary.json``."""
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: ScoreConfig) -> Path:
    """Resolve and check everything, then score under the output directory's lock."""
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    ckpt = resolve_checkpoint(cfg.checkpoint)
    model, schema, ckpt_config = load_ranker(ckpt, device, cfg.attention_backend, cfg.item_content)
    max_len = scoring_max_len(cfg, ckpt_config, ckpt)
    inputs = resolve_inputs(cfg, ckpt_config)
    out_dir = check_output_dir(cfg.output_dir, job_inputs(cfg, ckpt, inputs.dataset_dirs))  # before anything is written
    opened = OpenedJob(device, ckpt, model, schema, ckpt_config, max_len, inputs, out_dir)
    with lock_run_dir(out_dir):
        return _score(cfg, opened, t_start)


@dataclass
class OpenedJob:
    """What a scoring job resolved and checked before it touches its output directory."""

    device: torch.device
    ckpt: Path
    model: OneTransRanker
    schema: DataSchema
    ckpt_config: dict[str, Any]
    max_len: int
    inputs: ScoreInputs
    out_dir: Path


def _score(cfg: ScoreConfig, opened: OpenedJob, t_start: float) -> Path:
    device, ckpt, model, schema, ckpt_config = opened.device, opened.ckpt, opened.model, opened.schema, opened.ckpt_config
    max_len, out_dir, id_maps = opened.max_len, opened.out_dir, opened.inputs.id_maps
    files, dataset_files = opened.inputs.files, opened.inputs.dataset_files
    long_max_len = int(ckpt_config["data"]["loader"].get("long_max_len") or 0)  # model.long_seq: long history
    long_max_len = max(long_max_len, max_len) if long_max_len else 0
    parts = plan_partitions(files, cfg.rows_per_partition)
    job = {"checkpoint": checkpoint_identity(ckpt), "inputs": [(str(f), f.stat().st_size) for f in files],
           "mode": cfg.mode.value, "max_len": max_len, "rows_per_partition": cfg.rows_per_partition,
           "batch_size": cfg.batch_size, "candidate_chunk": cfg.candidate_chunk,
           "attention_backend": AttentionBackend(model.backend).value, "device": device.type,
           "cache": asdict(cfg.cache), "catalog": asdict(cfg.catalog) if cfg.mode == ScoreMode.catalog else None}
    if id_maps is not None:  # the partitions carry raw-id columns: a part of what they hold (absent: as before)
        job["raw_ids"] = str(id_maps.path)
    prepare_output(out_dir, job, parts, cfg.overwrite)
    done = finished(out_dir, parts)

    cache = UserKVCache(cfg.cache.max_bytes) if cfg.cache.enabled else None
    memory_cache = None  # model.long_seq.memory: keep per-user VQ memory states beside the KV cache
    if cache is not None and model.tokenizer.long is not None and model.tokenizer.long.memory is not None:
        memory_cache = LongMemoryCache()
    scorer = CachedScorer(model, cache, cfg.candidate_chunk, memory_cache=memory_cache)
    tasks = list(schema.tasks)
    catalog_info: dict[str, Any] = {}
    ranker = None
    if cfg.mode == ScoreMode.catalog:
        cat_files = sorted(set(files) | set(dataset_files) | set(expand_files(cfg.catalog.category_files)))
        cats = collect_item_categories(cat_files, schema)
        items, item_cats = catalog_items(schema, cfg.catalog.items_file, cats)
        ranker = CatalogRanker(scorer, items, item_cats, cfg, schema.num_items, device)
        catalog_info = {"catalog_items": int(len(items)), "category_files": [str(f) for f in cat_files],
                        "category_coverage": float(cats.seen[items].mean()) if len(items) else None,
                        "category_conflicts": cats.conflicts, "rank_task": tasks[ranker.rank_t],
                        "seen_items_in_candidate_set": not cfg.catalog.exclude_history,
                        "target": cfg.catalog.target.value}

    todo = [p for p in parts if p.index not in done]
    if cfg.max_partitions:
        todo = todo[:cfg.max_partitions]
    reader = PartitionReader(schema)
    n_req = n_cand = 0
    score_time = 0.0
    t_loop = time.perf_counter()
    bar = tqdm(total=sum(p.num_rows for p in todo), disable=not cfg.progress, desc="score", unit="req",
               dynamic_ncols=True)
    for part in todo:
        if cache is not None and cfg.cache.reset_per_partition:
            cache.clear()
            if memory_cache is not None:
                memory_cache.clear()
        table = reader.read(part)
        pieces: list[dict[str, np.ndarray]] = []
        for s in range(0, table.num_rows, cfg.batch_size):
            batch = collate(table.slice(s, cfg.batch_size), schema, max_len, long_max_len).to(device)
            t0 = time.perf_counter()
            if ranker is None:
                logits = scorer.score_batch(batch)
                pieces.append(candidate_rows(batch, logits, tasks))
                n_cand += batch.num_candidates
            else:
                pieces.append(ranker.rows(batch, list(schema.sequences)))
                n_cand += batch.num_requests * len(ranker.items)
            score_time += time.perf_counter() - t0
            n_req += batch.num_requests
            bar.update(batch.num_requests)
        cols = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
        write_partition(out_dir / part.name, pa.table(with_raw_ids(cols, id_maps)))  # + raw_user_id / raw_item_id
        if cfg.pause_after_partition_s:
            time.sleep(cfg.pause_after_partition_s)
    bar.close()
    loop_time = time.perf_counter() - t_loop

    stats = cache.stats.as_dict() if cache is not None else {}
    remaining = len(parts) - len(finished(out_dir, parts))
    summary: dict[str, Any] = {
        "mode": cfg.mode.value, "checkpoint": str(ckpt), "inputs": [str(f) for f in files],
        "output_dir": str(out_dir.resolve()), "device": device.type,
        "attention_backend": AttentionBackend(model.backend).value, "threads": torch.get_num_threads(),
        "complete": remaining == 0, "partitions_total": len(parts), "partitions_written": len(todo),
        "partitions_skipped": len(done), "partitions_remaining": remaining,
        "requests": n_req, "candidates": n_cand, "loop_time_s": loop_time, "score_time_s": score_time,
        "requests_per_s": n_req / loop_time if n_req else None,
        "candidates_per_s": n_cand / loop_time if n_req else None,
        "model_candidates_per_s": n_cand / score_time if n_req else None,
        "cache_enabled": cache is not None, "cache_max_bytes": cfg.cache.max_bytes if cache is not None else 0,
        "cache_reset_per_partition": cfg.cache.reset_per_partition,
        "cache_hit_rate": stats.get("hit_rate"), "cache": stats,
        "max_len": max_len, "batch_size": cfg.batch_size, "candidate_chunk": cfg.candidate_chunk,
        **catalog_info,
        "id_maps": str(id_maps.path) if id_maps is not None else None,  # raw_user_id / raw_item_id columns
        "inputs_eventlog": opened.inputs.eventlog,
        "metrics": summary_metrics(out_dir, cfg, tasks),
        "metrics_note": ("over every partition on disk" + ("" if remaining == 0 else
                                                           f" ({remaining} partitions still missing)")),
        "total_time_s": time.perf_counter() - t_start,
    }
    if cfg.mode == ScoreMode.catalog:
        summary["protocol"] = (f"full-catalog ranking of {catalog_info['catalog_items']} items by "
                               f"score_{catalog_info['rank_task']}; targets = {cfg.catalog.target.value} of each "
                               "request; seen items " + ("excluded" if cfg.catalog.exclude_history else "kept") +
                               f"; HR@{cfg.catalog.k}/NDCG@{cfg.catalog.k} averaged over targets; ties by item id")
    path = out_dir / "summary.json"
    atomic_write_bytes(path, json.dumps(summary, indent=2, default=json_default).encode())
    return path



__all__ = ["load_ranker", "resolve_checkpoint", "run_scoring"]
