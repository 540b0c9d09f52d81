"""analyze.py's outputs: the figures (attention distance, head similarity, average attention maps, loss
landscapes) side by side for every model, and analysis.json; each written atomically."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fd_ref.files import write_atomic


# ----------------------------------------------------------------------------------------------------------
# Figures (matplotlib's object API on the Agg canvas: no display, no global pyplot state)
# ----------------------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path: Path, dpi: int) -> None:
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def _finite(values) -> list[float]:
    """Non-finite values (a diverged landscape point) become NaN for plotting."""
    return [v if v is not None and math.isfinite(v) else float("nan") for v in values]


def _model_title(r: dict) -> str:
    return (f"{r['label']}\n({r['img_size']} px, patch {r['patch_size'][0]}, {r['depth']} layers x "
            f"{r['heads']} heads)")


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator
    axis.set_major_locator(MaxNLocator(integer=True))


def figure_distance(results: list[dict], path: Path, dpi: int = 120) -> None:
    n = len(results)
    fig = _new_figure(max(4.0, 3.6 * n), 3.8)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    for i, (ax, r) in enumerate(zip(axes, results)):
        color = f"C{i}"
        for layer, heads in enumerate(r["attention_distance"], start=1):
            ax.scatter([layer] * len(heads), heads, s=14, color=color, alpha=0.75, linewidths=0)
        means = [sum(h) / len(h) for h in r["attention_distance"]]
        ax.plot(range(1, r["depth"] + 1), means, color=color, alpha=0.4, lw=1, label="mean over heads")
        ax.set_title(_model_title(r), fontsize=9)
        ax.set_xlabel("layer")
        _integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("average attention distance (pixels)")
    top = max(max(max(h) for h in r["attention_distance"]) for r in results)
    axes[0].set_ylim(0, 1.08 * top if math.isfinite(top) and top > 0 else 1.0)
    fig.suptitle("Attention distance of every head (one dot per head)", fontsize=10)
    _save_figure(fig, path, dpi)


def figure_similarity(results: list[dict], path: Path, dpi: int = 120) -> None:
    fig = _new_figure(6.0, 4.0)
    ax = fig.subplots()
    for i, r in enumerate(results):
        values = [v if v is not None else float("nan") for v in r["head_similarity"]]
        ax.plot(range(1, r["depth"] + 1), values, marker="o", ms=4, color=f"C{i}", label=r["label"])
    ax.set_xlabel("layer")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel("mean cosine similarity between heads")
    ax.set_title("Head similarity: cosine between the attention maps of two heads\n"
                 "(per image, averaged over images and head pairs; lower = more diverse)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_figure(fig, path, dpi)


def figure_maps(results: list[dict], path: Path, dpi: int = 120) -> None:
    rows = len(results)
    cols = max(len(r["average_attention_maps"]["layers"]) for r in results)
    fig = _new_figure(3.2 * cols + 0.5, 3.0 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for row, r in enumerate(results):
        chosen = r["average_attention_maps"]
        for col in range(cols):
            ax = axes[row][col]
            if col >= len(chosen["layers"]):
                ax.set_axis_off()
                continue
            image = ax.imshow(chosen["maps"][col], cmap="viridis", interpolation="nearest")
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(f"{r['label']}: layer {chosen['layers'][col]}", fontsize=9)
            ax.set_xlabel("key token", fontsize=8)
            ax.set_ylabel("query token", fontsize=8)
            ax.tick_params(labelsize=7)
            _integer_ticks(ax.xaxis)
            _integer_ticks(ax.yaxis)
    fig.suptitle("Average attention maps (mean over images and heads; token 0 = class token)", fontsize=10)
    _save_figure(fig, path, dpi)


def figure_landscape_1d(results: list[dict], path: Path, dpi: int = 120) -> None:
    fig = _new_figure(9.0, 3.8)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for i, r in enumerate(results):
        one = r["landscape"]["1d"]
        ax_loss.plot(one["alphas"], _finite(one["loss"]), marker="o", ms=3, color=f"C{i}", label=r["label"])
        ax_acc.plot(one["alphas"], _finite(one["accuracy"]), marker="o", ms=3, color=f"C{i}", label=r["label"])
    ax_loss.set_ylabel("cross-entropy")
    ax_acc.set_ylabel("top-1 accuracy")
    ax_acc.set_ylim(-0.03, 1.03)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("alpha (filter-normalised direction)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("1-D loss landscape along a random filter-normalised direction", fontsize=10)
    _save_figure(fig, path, dpi)


def figure_landscape_2d(results: list[dict], path: Path, dpi: int = 120) -> None:
    n = len(results)
    fig = _new_figure(max(4.5, 4.2 * n), 3.9)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, r in zip(axes, results):
        two = r["landscape"]["2d"]
        # contourf wants z[row = beta][col = alpha]; the landscape is loss[alpha][beta].
        z = [[_finite(row)[j] for row in two["loss"]] for j in range(len(two["betas"]))]
        contour = ax.contourf(two["alphas"], two["betas"], z, levels=20, cmap="viridis")
        fig.colorbar(contour, ax=ax, label="cross-entropy")
        ax.plot([0], [0], marker="+", color="white", ms=10)
        ax.set_title(r["label"], fontsize=9)
        ax.set_xlabel("alpha (direction 1)")
        ax.set_ylabel("beta (direction 2)")
    fig.suptitle("2-D loss landscape (Li et al. 2018 filter-normalised directions)", fontsize=10)
    _save_figure(fig, path, dpi)


# ----------------------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------------------
def _json_safe(obj: Any) -> Any:
    """Non-finite floats -> None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(obj: Any, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(_json_safe(obj), f, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    write_atomic(path, write)
