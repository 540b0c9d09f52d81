"""Training curves from ``log.jsonl``: loss and lr against the optimiser step, one or several runs side by
side (plus validation top-1 when a run evaluated). ``python analyze.py --log out/a out/b`` draws them."""
from __future__ import annotations

import json
import math
from pathlib import Path

from fd_ref.errors import UserError
from fd_ref.files import write_atomic

FIGURE = "training_curves.png"


def read_run(spec: str) -> tuple[str, list[dict]]:
    """``label=folder`` or ``folder`` (labelled by its name; a log.jsonl path works too) -> its records."""
    label, _, path = spec.rpartition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    path = Path(path)
    log = path / "log.jsonl" if path.is_dir() else path
    if not log.is_file():
        raise UserError(f"{path} has no log.jsonl; pass a run folder written by train.py or finetune.py")
    records = []
    for number, line in enumerate(log.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{log} line {number} is not JSON; is it a log.jsonl of train.py / "
                                f"finetune.py?") from None
    if not any("loss" in r and "step" in r for r in records):
        raise UserError(f"{log} holds no training steps yet (no record with step and loss)")
    return label or (log.parent.name if log.name == "log.jsonl" else log.stem), records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the records that have both, finite values only, in record order."""
    points = [(r["step"], r[key]) for r in records if key in r and "step" in r
              and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def draw_training_curves(runs: list[tuple[str, list[dict]]], path: str | Path, dpi: int = 120) -> Path:
    """Write the figure to ``path`` (a temporary file renamed into place); returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_top1 = any(series(records, "top1")[0] for _, records in runs)
    panels = [("loss", "training loss", True), ("lr", "learning rate (base)", False)]
    if with_top1:
        panels.append(("top1", "validation top-1 (%)", False))
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    for ax, (key, title, log_scale) in zip(axes, panels):
        for colour, (label, records) in enumerate(runs):  # one colour per run in every panel
            train_only = [r for r in records if "loss" in r] if key != "top1" else records
            steps, values = series(train_only, key)
            if steps:
                ax.plot(steps, values, marker="o" if key == "top1" or len(steps) < 12 else None,
                        markersize=3, label=label, color=f"C{colour % 10}")
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        if log_scale and all(v > 0 for _, r in runs for v in series(r, key)[1]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
