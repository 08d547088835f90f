"""The report's figures. Each ``*_figure`` returns a matplotlib Figure built from exactly the arrays
it is given (tests read the plotted points back); :func:`save` writes a PNG and closes it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def roc_figure(fpr: np.ndarray, tpr: np.ndarray, auc_value: float | None, title: str) -> Figure:
    """ROC curve: line 0 holds the ``(fpr, tpr)`` points, line 1 the chance diagonal."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, lw=1.6, label=f"model (AUC {auc_value:.4f})" if auc_value is not None else "model")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right")
    return fig


def calibration_figure(rows: list[dict], ece: float, title: str) -> Figure:
    """Mean predicted probability vs observed positive rate per bin (marker size ~ rows), with the diagonal."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    x = [r["mean_pred"] for r in rows]
    y = [r["pos_rate"] for r in rows]
    n = np.array([r["count"] for r in rows], dtype=np.float64)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect")
    ax.plot(x, y, "-o", lw=1.4, label=f"model (ECE {ece:.4f})")
    if n.size:
        ax.scatter(x, y, s=20 + 200 * n / n.max(), alpha=0.3)
    ax.set(xlabel="mean predicted probability", ylabel="observed positive rate", xlim=(0, 1), ylim=(0, 1),
           title=title)
    ax.legend(loc="upper left")
    return fig


def bucket_figure(rows: list[dict], title: str, xlabel: str, overall_auc: float | None) -> Figure:
    """Grouped bars of AUC and GAUC per bucket (undefined values are left out), row counts on top."""
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(rows) + 2), 4))
    x = np.arange(len(rows))
    for off, key, color in ((-0.2, "auc", "tab:blue"), (0.2, "gauc", "tab:orange")):
        vals = [r[key] if r[key] is not None else np.nan for r in rows]
        ax.bar(x + off, vals, width=0.4, label=key.upper(), color=color)
    for i, r in enumerate(rows):
        ax.annotate(f"n={r['rows']}", (i, 0.02), ha="center", fontsize=7, rotation=90, color="white")
    if overall_auc is not None:
        ax.axhline(overall_auc, color="black", lw=1, ls=":", label=f"overall AUC {overall_auc:.3f}")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, [r["bucket"] for r in rows], rotation=20, fontsize=8)
    ax.set(ylim=(0, 1), xlabel=xlabel, ylabel="AUC", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def training_figure(log: list[dict], metric: str = "valid_auc") -> Figure:
    """Training loss over steps (left) and the validation metric over steps (right) from train_log.jsonl rows."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    loss = [(r["step"], r["loss"]) for r in log if "loss" in r]
    evals = [(r["step"], r[metric]) for r in log if r.get(metric) is not None]
    if loss:
        s, v = zip(*loss)
        a1.plot(s, v, lw=1.2)
    a1.set(xlabel="step", ylabel="training loss (batch)", title="loss")
    if evals:
        s, v = zip(*evals)
        a2.plot(s, v, "-o", lw=1.2, ms=3)
    else:
        a2.text(0.5, 0.5, f"no {metric} in the log\n(train.eval_every=0)", ha="center", va="center")
    a2.set(xlabel="step", ylabel=metric, title=metric)
    return fig


def comparison_figure(models: list[str], metrics: dict[str, list[float | None]], errors: dict[str, list[float]],
                      title: str) -> Figure:
    """One panel per metric, one bar per model (error bar = std over seeds)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    for ax, (name, vals) in zip(axes[0], metrics.items()):
        v = [x if x is not None else np.nan for x in vals]
        ax.bar(np.arange(len(models)), v, yerr=errors.get(name), color=plt.cm.tab10(np.arange(len(models))))
        ax.set_xticks(np.arange(len(models)), models, rotation=30, fontsize=8)
        if "/s" in name:  # throughputs span orders of magnitude
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
    fig.suptitle(title, fontsize=10)
    return fig
