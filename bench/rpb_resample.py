"""Relative position tables at another resolution: fd-ref's cubic resampling against linear, and against the
published SciPy call (issue #23).

fd-ref (``fd_ref/method/position.py``) resamples a table as the published ``utils.py`` does: the old offsets placed
on a geometric progression, then the not-a-knot bicubic spline of SciPy's ``interp2d(kind="cubic")``. timm's
``resize_rel_pos_bias_table`` builds the same progression but, without SciPy, interpolates linearly. This
script measures how far the two are apart on learned tables (the CIFAR-10 study's distilled FD student: its
shared 8 x 8 table, and the six per-block tables of its fine-tuned model) and on random N(0, 1) tables.

    python bench/rpb_resample.py --json bench/results/rpb_resample.json

``--export FILE`` writes random tables and fd-ref's resampling of them (npz); ``--check-interp2d FILE`` reads
that file in any Python with numpy and a SciPy that still has ``interp2d`` (before 1.14; no torch needed) and
prints the largest difference from the published call, the geometric positions written out again here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "bench" / "results" / "cifar10_study" / "stages"
RESIZES = [((8, 8), (12, 12)), ((8, 8), (16, 16)), ((8, 8), (6, 6)), ((14, 14), (24, 24))]


def learned_tables():
    """name -> (table [(2H-1)^2 + 3, heads], grid) from the study's files (8 x 8 patch grid at 32 px)."""
    import torch

    out = {}
    blob = torch.load(STUDY / "fd" / "student.pt", map_location="cpu", weights_only=True)
    out["fd student, shared table"] = blob["model"]["rel_pos_bias.table"]
    blob = torch.load(STUDY / "ft_fd_s0" / "best.pt", map_location="cpu", weights_only=True)
    for key, value in blob["model"].items():
        if key.endswith("rel_pos_bias.table"):
            out[f"fine-tuned, {key.split('.attn')[0]}"] = value
    return out


def compare(json_path: Path | None) -> dict:
    import torch
    from timm.layers.pos_embed_rel import resize_rel_pos_bias_table

    sys.path.insert(0, str(ROOT))
    from fd_ref.method.position import num_relative_positions, resize_relative_position_bias_table

    tables = {name: (t.float(), (8, 8)) for name, t in learned_tables().items()}
    g = torch.Generator().manual_seed(0)
    rows = []
    for old, new in RESIZES:
        cases = [(n, t) for n, (t, grid) in tables.items() if grid == old]
        cases.append(("random N(0, 1)", torch.randn(num_relative_positions(old), 4, generator=g)))
        for name, table in cases:
            cubic = resize_relative_position_bias_table(table, old, new)
            n_new = num_relative_positions(new, cls_token=False)
            linear = resize_rel_pos_bias_table(table, new, (num_relative_positions(new), table.shape[1]),
                                               old_window_size=old)
            diff = (cubic[:n_new] - linear[:n_new]).abs()
            spread = table[:num_relative_positions(old, cls_token=False)].std().item()
            rows.append(dict(table=name, old=list(old), new=list(new), max_abs_diff=diff.max().item(),
                             mean_abs_diff=diff.mean().item(), table_std=spread,
                             max_diff_over_std=diff.max().item() / spread))
    print(f"{'table':28s} {'grid':>11s} {'max |cubic-linear|':>19s} {'mean':>9s} {'table std':>9s} {'max/std':>8s}")
    for r in rows:
        grid = f"{r['old'][0]}->{r['new'][0]}"
        print(f"{r['table']:28s} {grid:>11s} {r['max_abs_diff']:19.4f} {r['mean_abs_diff']:9.4f} "
              f"{r['table_std']:9.4f} {r['max_diff_over_std']:8.3f}")
    result = dict(torch=torch.__version__, rows=rows)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def export(path: Path) -> None:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from fd_ref.method.position import num_relative_positions, resize_relative_position_bias_table

    g = torch.Generator().manual_seed(0)
    arrays = {}
    for old, new in [((3, 3), (5, 5)), ((7, 7), (12, 12)), ((8, 8), (6, 6)), ((4, 4), (20, 20)), *RESIZES]:
        table = torch.randn(num_relative_positions(old), 4, generator=g)
        arrays[f"{old[0]}_{new[0]}_in"] = table.numpy()
        arrays[f"{old[0]}_{new[0]}_out"] = resize_relative_position_bias_table(table, old, new).numpy()
    np.savez(path, **arrays)


def check_interp2d(path: Path) -> None:
    """numpy + SciPy < 1.14 only: the published resampling of each exported table against fd-ref's."""
    import warnings

    import numpy as np
    from scipy.interpolate import interp2d

    warnings.simplefilter("ignore", DeprecationWarning)
    data = np.load(path)
    for key in sorted(k for k in data.files if k.endswith("_in")):
        old, new = (int(v) for v in key.split("_")[:2])
        src, dst = 2 * old - 1, 2 * new - 1
        left, right = 1.01, 1.5
        while right - left > 1e-6:  # the ratio of the progression, bisected as published
            q = (left + right) / 2.0
            left, right = (left, q) if sum(q ** k for k in range(src // 2)) > dst // 2 else (q, right)
        ends = [sum(q ** k for k in range(j)) for j in range(1, src // 2 + 1)]
        positions = [-e for e in reversed(ends)] + [0.0] + ends
        targets = np.arange(-(dst // 2), dst // 2 + 1, dtype=np.float64)
        table, ours = data[key], data[key.replace("_in", "_out")]
        published = np.stack([interp2d(positions, positions, table[:src * src, h].reshape(src, src).astype(np.float64),
                                       kind="cubic")(targets, targets).reshape(-1) for h in range(table.shape[1])], -1)
        print(f"{old}x{old} -> {new}x{new}: max |fd-ref - interp2d| = {np.abs(published - ours[:dst * dst]).max():.2e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--export", type=Path, default=None)
    parser.add_argument("--check-interp2d", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.check_interp2d:
        return check_interp2d(args.check_interp2d)
    if args.export:
        return export(args.export)
    compare(args.json)


if __name__ == "__main__":
    main()
