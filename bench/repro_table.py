"""Summarise bench/mini_repro.sh: validation top-1 of the fine-tuned teacher vs FD student (mean, std
over seeds), stage times, and the diagnostics' per-layer means. Writes OUT/summary.json and prints a
Markdown table.

    python bench/repro_table.py runs/mini_repro
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(out: str) -> None:
    root = Path(out)
    rows, summary = [], {}
    names = {"teacher": "teacher (supervised from scratch), fine-tuned", "fd": "FD student, fine-tuned",
             "scratch": "control: student network from scratch, FD + fine-tuning epochs",
             "target_cls": "FD of the class token only, fine-tuned",
             "target_avg": "FD of the average-pooled feature only, fine-tuned",
             "no_whiten": "FD without whitening, fine-tuned", "abs_pos": "FD with absolute pos. emb. "
             "instead of shared RPB, fine-tuned", "sym_drop": "FD with student drop path 0, fine-tuned"}
    for kind, name in names.items():
        pattern = "scratch_s*/results.json" if kind == "scratch" else f"ft_{kind}_s*/results.json"
        runs = sorted(root.glob(pattern))
        top1 = [json.loads(r.read_text())["final"]["top1"] for r in runs]
        if not top1:
            continue
        mean = statistics.mean(top1)
        std = statistics.stdev(top1) if len(top1) > 1 else 0.0
        summary[kind] = {"top1": top1, "mean": mean, "std": std}
        rows.append(f"| {name} | {', '.join(f'{t:.2f}' for t in top1)} | {mean:.2f} +- {std:.2f} |")
    teacher_json = root / "teacher" / "results.json"
    if teacher_json.exists():
        summary["teacher_before_ft"] = json.loads(teacher_json.read_text())["final"]["top1"]
    times = {p.parent.name: int(p.read_text()) for p in root.glob("*/seconds")}
    summary["seconds"] = times
    analysis = root / "analysis" / "analysis.json"
    if analysis.exists():
        data = json.loads(analysis.read_text())
        models = data["models"] if isinstance(data.get("models"), list) else data.get("models", {}).values()
        summary["diagnostics"] = {}
        for m in models:
            dist = [sum(layer) / len(layer) for layer in m["attention_distance"]]
            summary["diagnostics"][m["label"]] = {"mean_attention_distance_per_layer": dist,
                                                  "head_similarity_per_layer": m["head_similarity"]}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print("| model | val top-1 per seed (%) | mean +- std |\n|---|---|---|")
    print("\n".join(rows))
    if "teacher_before_ft" in summary:
        print(f"\nteacher after its own supervised training: {summary['teacher_before_ft']:.2f}%")
    print(f"stage times (s): {times}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/mini_repro")
