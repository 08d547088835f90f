"""``run_comparison``: train each model preset on the same data with the same schedule, evaluate each
with ``recsys.evaluate`` (same split, metrics and catalog protocol), and write
``table.md`` / ``table.json`` / ``bars.png`` under ``output_dir``.

A (preset, seed) run lives in ``<output_dir>/<preset>-seed<k>/``; training resumes from its
checkpoint when rerun (``train.resume``), so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from recsys.compare.config import CompareConfig
from recsys.compare.table import markdown_table, summarize
from recsys.configs import CONFIG_DIR
from recsys.evaluate.config import EvaluateConfig
from recsys.evaluate.plots import comparison_figure, save
from recsys.evaluate.run import eval_config_dict, run_evaluation
from recsys.model.config import ModelConfig
from recsys.reliability.rundir import check_output_dir, lock_run_dir
from recsys.serving.load import resolve_checkpoint
from recsys.train.config import RunConfig
from recsys.train.loop import train, train_inputs


def model_preset(name: str, overrides: list[str]) -> ModelConfig:
    """configs/model/<name>.yaml (+ dotted overrides) merged into a validated ModelConfig."""
    path = CONFIG_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
        raise ValueError(f"unknown model preset {name!r}; configs/model/ has {known}")
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(node)


def reuse_or_evaluate(ev: EvaluateConfig) -> dict[str, Any]:
    """The run's eval/metrics.json when it was written for this checkpoint with these settings, after
    the checkpoint was saved (a rerun of the comparison only evaluates what changed); else evaluate."""
    old = Path(ev.output_dir) / "metrics.json"
    ckpt = resolve_checkpoint(ev.checkpoint)
    if old.is_file() and old.stat().st_mtime > ckpt.stat().st_mtime:
        m = json.loads(old.read_text())
        if m.get("checkpoint") == str(ckpt) and m.get("eval_config") == eval_config_dict(ev):
            print(f"[compare] reusing {old}", flush=True)
            return m
    return json.loads(run_evaluation(ev).read_text())


def run_config(cfg: CompareConfig, name: str, model_cfg: ModelConfig, seed: int) -> RunConfig:
    """The training run of preset ``name`` with ``seed``: ``<output_dir>/<name>-seed<seed>/``."""
    return RunConfig(data=cfg.data, model=model_cfg, train=replace(cfg.train, seed=seed),
                     output_dir=str(Path(cfg.output_dir) / f"{name}-seed{seed}"))


def run_comparison(cfg: CompareConfig) -> Path:
    """Train + evaluate every (preset, seed); returns the path of ``table.md``.

    Before anything is written: every preset is built (a typo fails fast) and ``output_dir`` is checked
    against what every run reads (``train_inputs``: the data, a model's ``sid_path``); the comparison then
    runs under the directory's lock, each training run and evaluation under its own.
    """
    presets = {m: model_preset(m, list(cfg.model_overrides.get(m, []))) for m in cfg.models}  # fail fast
    out = check_output_dir(cfg.output_dir, [i for name, m in presets.items()
                                            for i in train_inputs(run_config(cfg, name, m, cfg.seeds[0]))])
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    with lock_run_dir(out):
        return _compare(cfg, out, presets)


def _compare(cfg: CompareConfig, out: Path, presets: dict[str, ModelConfig]) -> Path:
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        for name, model_cfg in presets.items():
            run = run_config(cfg, name, model_cfg, seed)
            run_dir = Path(run.output_dir)
            print(f"[compare] {name} seed {seed} -> {run_dir}", flush=True)
            t0 = time.perf_counter()
            report = json.loads(train(run).read_text())
            wall_train = time.perf_counter() - t0
            ev = EvaluateConfig(checkpoint=str(run_dir), output_dir=str(run_dir / "eval"), batch_size=cfg.batch_size,
                                catalog=cfg.catalog, progress=cfg.train.progress,
                                num_threads=cfg.num_threads)
            metrics = reuse_or_evaluate(ev)
            rows.append({"model": name, "arch": model_cfg.arch.value, "seed": seed, "run_dir": str(run_dir),
                         **{k: metrics.get(k) for k in ("auc", "gauc", "logloss", "hr@10", "ndcg@10", "oracle_auc",
                                                        "score_candidates_per_s", "catalog_requests", "ece")},
                         "train_time_s": report["train_time_s"], "train_samples_per_s": report["train_samples_per_s"],
                         "train_wall_s": wall_train, "steps": report["steps"],
                         "params_dense": report["params_dense"], "params_sparse": report["params_sparse"],
                         "count_popularity_auc": report.get("popularity_auc")})
            (out / "runs.json").write_text(json.dumps(rows, indent=2))
    summary = summarize(rows, cfg.models)
    protocol = metrics.get("protocol", {})
    table = markdown_table(summary)
    oracle = [s["oracle_auc_mean"] for s in summary if s["oracle_auc_mean"] is not None]
    notes = [f"data: {cfg.data.source.value}; seeds {list(cfg.seeds)}; epochs {cfg.train.epochs}"
             f"{f', max_steps {cfg.train.max_steps}' if cfg.train.max_steps else ''}; "
             f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]
    if oracle:
        notes.append(f"oracle AUC (planted probabilities, same rows): {oracle[0]:.4f}")
    counted = [r["count_popularity_auc"] for r in rows if r.get("count_popularity_auc") is not None]
    if counted:  # identical data -> identical counts in every run; shown once
        notes.append(f"count-based popularity AUC (positives per item in the first training epoch, "
                     f"recsys.train's popularity_auc): {counted[0]:.4f}")
    notes += [f"{k}: {v}" for k, v in protocol.items()]
    (out / "table.md").write_text(table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    (out / "table.json").write_text(json.dumps({"summary": summary, "runs": rows, "notes": notes,
                                                "config": json.loads(json.dumps(OmegaConf.to_container(
                                                    OmegaConf.structured(cfg), resolve=True)))}, indent=2))
    names = [s["model"] for s in summary]
    keys = {"AUC": "auc", "HR@10": "hr@10", "NDCG@10": "ndcg@10", "scoring cand/s": "score_candidates_per_s"}
    save(comparison_figure(names, {h: [s[f"{k}_mean"] for s in summary] for h, k in keys.items()},
                           {h: [s[f"{k}_std"] or 0.0 for s in summary] for h, k in keys.items()},
                           notes[0]), out / "bars.png")
    return out / "table.md"
