"""Quality report of a semantic-ID assignment: JSON-able dict + a PNG figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recsys.quant.collisions import CollisionStats


def level_stats(codes: torch.Tensor, cardinality: list[int]) -> list[dict[str, Any]]:
    """Per code column: utilisation (share of codes used), perplexity ``exp(H)`` of the code
    distribution (= K when perfectly even), and items-per-used-code min / median / max."""
    out = []
    for col, k in enumerate(cardinality):
        counts = torch.bincount(codes[:, col], minlength=k).double()
        p = counts / counts.sum().clamp_min(1)
        nz = p[p > 0]
        used = counts[counts > 0]
        out.append({"codes": k, "used": int((counts > 0).sum()), "utilisation": float((counts > 0).double().mean()),
                    "perplexity": float(torch.exp(-(nz * nz.log()).sum())) if len(nz) else 0.0,
                    "items_per_code_min": int(used.min()) if len(used) else 0,
                    "items_per_code_median": float(used.median()) if len(used) else 0.0,
                    "items_per_code_max": int(used.max()) if len(used) else 0})
    return out


def recon_errors(x: torch.Tensor, recons: list[torch.Tensor]) -> list[float]:
    """Relative squared error ``sum ||x - x_hat_l||^2 / sum ||x||^2`` after each level (x is centred)."""
    denom = x.pow(2).sum().clamp_min(1e-12)
    return [float((x - r).pow(2).sum() / denom) for r in recons]


def build_report(x: torch.Tensor, codes: torch.Tensor, cardinality: list[int], recons: list[torch.Tensor],
                 stats: CollisionStats, history: list[dict[str, float]], extra: dict[str, Any]) -> dict[str, Any]:
    """``x [N, d]`` (preprocessed content), ``codes [N, M]`` before the collision fix."""
    return {**extra, "items": int(x.shape[0]), "content_dim": int(x.shape[1]),
            "recon_error_per_level": recon_errors(x, recons), "levels": level_stats(codes, cardinality),
            "collision_rate_before_fix": stats.collision_rate, "unique_tuples_before_fix": stats.unique_tuples,
            "max_items_per_tuple": stats.max_items_per_tuple, "train_history": history}


def plot_report(report: dict[str, Any], codes: torch.Tensor, path: Path) -> None:
    """Three panels: reconstruction error per level, perplexity vs codebook size, items per code."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lv = report["levels"]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(range(1, len(report["recon_error_per_level"]) + 1), report["recon_error_per_level"], "o-")
    ax[0].set(xlabel="levels used", ylabel="relative squared error", title="reconstruction")
    idx = range(len(lv))
    ax[1].bar(idx, [s["codes"] for s in lv], color="lightgray", label="codebook size")
    ax[1].bar(idx, [s["perplexity"] for s in lv], label="perplexity")
    ax[1].set(xlabel="level / expert", title="code utilisation")
    ax[1].legend()
    for col in range(codes.shape[1]):
        counts = torch.bincount(codes[:, col])
        ax[2].hist(counts[counts > 0].numpy(), bins=30, histtype="step", label=f"level {col}")
    ax[2].set(xlabel="items per used code", ylabel="codes", title=
              f"collisions before fix {report['collision_rate_before_fix']:.1%}")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
