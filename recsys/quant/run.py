"""``quantize(cfg)``: content vectors -> fitted quantizer -> unique semantic IDs + report."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from recsys.data.config import DataSource
from recsys.data.prepare import raw_inputs
from recsys.errors import InputError
from recsys.quant.artifact import SemanticIds
from recsys.quant.collisions import rebalance_last_level, resolve_collisions
from recsys.quant.config import CollisionFix, ContentSource, QuantConfig, QuantMethod
from recsys.quant.content import (
    checkpoint_content,
    read_content_parquet,
    side_feature_content,
    synthetic_content,
)
from recsys.quant.multi_expert import MultiExpertQuantizer, orthogonality_penalty, train_multi_expert
from recsys.quant.report import build_report, plot_report, recon_errors
from recsys.quant.rq_kmeans import RQKMeans
from recsys.quant.rq_vae import RQVAE, train_rqvae
from recsys.reliability.rundir import check_output_dir, lock_run_dir


def load_content(cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(item_ids [N], vectors [N, d])`` of the configured source."""
    c = cfg.content
    if c.source == ContentSource.parquet:
        return read_content_parquet(c.path)
    if c.source == ContentSource.checkpoint:
        return checkpoint_content(c.path)
    if c.source == ContentSource.side_features:
        return side_feature_content(cfg.data)
    if cfg.data.source != DataSource.synthetic:
        raise InputError(f"content.source=synthetic needs synthetic data (data=synthetic or data=tiny), got "
                         f"data.source={cfg.data.source.value}")
    return synthetic_content(cfg.data.synthetic, c.dim, c.noise, c.w_popularity, c.w_quality)


def table_size(cfg: QuantConfig, ids: torch.Tensor) -> int:
    """Rows of the SID table: the dataset's item table where known, else max id + 1."""
    if cfg.data.source == DataSource.synthetic and cfg.content.source != ContentSource.parquet:
        return cfg.data.synthetic.num_items + 1
    return int(ids.max()) + 1


def auto_codebook_size(n: int, levels: int) -> int:
    """min(256, n, 2 * next power of two >= n^(1/levels)): enough codes that L levels can separate n items,
    never more codes than items."""
    return int(min(256, max(1, n), 2 * 2 ** math.ceil(math.log2(max(2.0, n ** (1.0 / levels))))))


def check_content(cfg: QuantConfig, ids: torch.Tensor, raw: torch.Tensor) -> None:
    """Refuses content and settings that cannot give a meaningful result, before any fitting: an empty or
    non-finite catalog, and a codebook larger than the catalog (a level cannot use more codes than there
    are items; k-means over it would spend minutes seeding codes that stay empty)."""
    src = f"content.source={cfg.content.source.value}"
    if raw.ndim != 2 or len(raw) == 0 or raw.shape[1] == 0:
        raise InputError(f"content vectors ({src}) must be a non-empty [N, d] tensor, got shape {tuple(raw.shape)}")
    if len(ids) != len(raw):
        raise InputError(f"content ({src}): {len(ids)} item ids but {len(raw)} vectors")
    finite = torch.isfinite(raw).all(1)
    if not finite.all():
        bad = int(torch.nonzero(~finite)[0])
        raise InputError(f"content vectors ({src}) contain NaN/Inf: item id {int(ids[bad])} (and "
                         f"{int((~finite).sum()) - 1} more)")
    n = len(raw)
    if cfg.codebook_size > n:
        raise InputError(f"codebook_size={cfg.codebook_size} is more than the {n} items to quantize ({src}): a "
                         f"level cannot use more codes than there are items; set codebook_size <= {n}, or 0 "
                         f"(auto: {auto_codebook_size(n, cfg.levels)} here)")


def fit_codes(cfg: QuantConfig, x: torch.Tensor) -> tuple[Any, torch.Tensor, list[dict[str, float]]]:
    """(fitted quantizer, codes ``[N, M]``, training history) for preprocessed ``x [N, d]``."""
    k = cfg.codebook_size or auto_codebook_size(len(x), cfg.levels)
    if cfg.method == QuantMethod.rq_kmeans:
        q = RQKMeans(cfg.levels, k, iters=cfg.kmeans_iters, balanced=cfg.balanced, seed=cfg.seed)
        return q, q.fit(x, progress=cfg.progress), []
    if cfg.method == QuantMethod.rq_vae:
        v = cfg.rq_vae
        q = RQVAE(x.shape[1], v.hidden, v.code_dim, cfg.levels, k)
        hist = train_rqvae(q, x, epochs=v.epochs, batch_size=v.batch_size, lr=v.lr, beta=v.beta, seed=cfg.seed,
                           progress=cfg.progress)
        return q, q.encode(x), hist
    e = cfg.multi_expert
    proj = e.proj_dim or max(1, x.shape[1] // e.experts)
    q = MultiExpertQuantizer(x.shape[1], e.experts, proj, k)
    hist = train_multi_expert(q, x, epochs=e.epochs, batch_size=e.batch_size, lr=e.lr, beta=e.beta,
                              orth_weight=e.orth_weight, seed=cfg.seed, progress=cfg.progress)
    return q, q.encode(x), hist


def quant_inputs(cfg: QuantConfig) -> list[tuple[str, str | Path | None]]:
    """What the command reads, as ``(config key, path)``: ``content.path`` (a Parquet or a checkpoint), and
    for ``content.source=side_features`` the dataset's raw files (ml-100k: its raw dir). ``output_dir`` must
    overlap none of them."""
    named: list[tuple[str, str | Path | None]] = [("content.path", cfg.content.path)]
    if cfg.content.source == ContentSource.side_features:
        named += raw_inputs(cfg.data)
    return named


def quantize(cfg: QuantConfig) -> Path:
    """Writes ``sids.pt`` (a :class:`SemanticIds`), ``report.json`` and ``report.png``; returns the sids path.

    ``output_dir`` is checked against the inputs (``check_output_dir``) and the content against the settings
    before anything is written; the outputs are then written under the directory's lock (``lock_run_dir``).
    """
    t0 = time.perf_counter()
    out = check_output_dir(cfg.output_dir, quant_inputs(cfg))
    ids, raw = load_content(cfg)
    check_content(cfg, ids, raw)
    print(f"[quant] {len(ids)} items x {raw.shape[1]} dims, {cfg.method.value}, codebook size "
          f"{cfg.codebook_size or auto_codebook_size(len(raw), cfg.levels)}", flush=True)
    with lock_run_dir(out):
        return _quantize(cfg, out, ids, raw, t0)


def _quantize(cfg: QuantConfig, out: Path, ids: torch.Tensor, raw: torch.Tensor, t0: float) -> Path:
    center = raw.mean(0)
    scale = (raw - center).pow(2).sum(1).mean().sqrt().clamp_min(1e-12)  # mean item norm 1 after centring
    x = (raw - center) / scale
    q, codes, history = fit_codes(cfg, x)
    extra: dict[str, Any] = {}
    final = codes
    if cfg.collision_fix == CollisionFix.rebalance_last:
        final = rebalance_last_level(codes, q.last_level_costs(x, codes))
        extra["rebalanced_items"] = int((final[:, -1] != codes[:, -1]).sum())
        extra["recon_error_after_rebalance"] = recon_errors(x, q.reconstructions(final))[-1]
    fixed, after = resolve_collisions(final)
    stats = after if final is codes else resolve_collisions(codes)[1]  # the report's "before the fix" figures
    extra["collision_rate_before_extra_level"] = after.collision_rate
    size = max(table_size(cfg, ids), int(ids.max()) + 1)
    table = torch.full((size, fixed.shape[1]), -1, dtype=torch.int64)
    table[ids] = fixed
    sids = SemanticIds(table, torch.tensor(q.cardinality), center, scale, q.state())
    sids_path = out / "sids.pt"
    sids.save(sids_path)
    extra.update({"method": cfg.method.value, "content_source": cfg.content.source.value,
                  "collision_fix": cfg.collision_fix.value, "codebook_size": q.cardinality[0],
                  "disambiguation_codes": int(fixed[:, -1].max()) + 1, "seconds": round(time.perf_counter() - t0, 3)})
    if isinstance(q, MultiExpertQuantizer):
        extra["orthogonality_penalty"] = float(orthogonality_penalty(q.v.detach()))
    report = build_report(x, codes, q.cardinality, q.reconstructions(codes), stats, history, extra)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_report(report, codes, out / "report.png")
    print(f"[quant] {len(ids)} items, {cfg.method.value}: recon error per level "
          f"{[round(e, 4) for e in report['recon_error_per_level']]}, "
          f"collisions before fix {stats.collision_rate:.2%}, perplexity "
          f"{[round(s['perplexity'], 1) for s in report['levels']]}")
    return sids_path
