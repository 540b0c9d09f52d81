"""Summarise bench/mini_repro.sh: validation top-1 of the fine-tuned teacher vs FD student (mean, std
over seeds), stage times, and the diagnostics' per-layer means. Where further distillation seeds ran
(FD_SEEDS), each gets its own row, plus the runs of all distillation seeds pooled. The variants of issue #24
(CNN teacher, two teachers, PHI-S, cosine loss) get rows like the ablations, and every row the k-NN top-1
of its model(s) before fine-tuning (stages knn_*, summary["knn"]). Writes OUT/summary.json and prints a
Markdown table.

    python bench/repro_table.py runs/mini_repro
"""
from __future__ import annotations

import fnmatch
import json
import statistics
import sys
from pathlib import Path


def _top1(results) -> list[float]:
    return [json.loads(r.read_text())["final"]["top1"] for r in sorted(results)]


def _stats(top1: list[float]) -> dict:
    return {"top1": top1, "mean": statistics.mean(top1),
            "std": statistics.stdev(top1) if len(top1) > 1 else 0.0}


def _row(name: str, top1: list[float], note: str = "", knn: list[float] = ()) -> str:
    st = _stats(top1)
    knn_text = ", ".join(f"{t:.2f}" for t in knn) or "-"
    return (f"| {name} | {', '.join(f'{t:.2f}' for t in top1)} | {st['mean']:.2f} +- {st['std']:.2f}{note} "
            f"| {knn_text} |")


def _knn_stage(kind: str, suffix: str = "") -> str:
    """The k-NN stage of the model a row fine-tunes (scratch: a pattern over its seeds)."""
    if kind == "teacher":
        return "teacher"
    if kind == "scratch":
        return "scratch_s*"
    return f"fd{suffix}" if kind == "fd" else f"fd_{kind}{suffix}"


def main(out: str) -> None:
    root = Path(out)
    rows, summary = [], {}
    names = {"teacher": "teacher (supervised from scratch), fine-tuned", "fd": "FD student, fine-tuned",
             "scratch": "control: student network from scratch, FD + fine-tuning epochs",
             "target_cls": "FD of the class token only, fine-tuned",
             "target_avg": "FD of the average-pooled feature only, fine-tuned",
             "no_whiten": "FD without whitening, fine-tuned", "abs_pos": "FD with absolute pos. emb. "
             "instead of shared RPB, fine-tuned", "sym_drop": "FD with student drop path 0, fine-tuned",
             "cnn_teacher": "FD from the CNN teacher alone, fine-tuned",
             "two_teachers": "FD from the ViT and the CNN teacher at once, fine-tuned",
             "phi_s": "FD with PHI-S targets instead of whitening, fine-tuned",
             "cosine": "FD with the cosine loss instead of smooth-L1, fine-tuned",
             "masked": "masked FD (40% block masking, loss on the masked patches), fine-tuned"}
    knn = {p.parent.name[len("knn_"):]: json.loads(p.read_text())["knn"]["top1"]
           for p in sorted(root.glob("knn_*/results.json"))}
    if knn:
        summary["knn"] = knn

    def knn_of(kind: str, suffix: str = "") -> list[float]:
        return [top1 for stage, top1 in knn.items() if fnmatch.fnmatchcase(stage, _knn_stage(kind, suffix))]
    for kind, name in names.items():
        pattern = "scratch_s*/results.json" if kind == "scratch" else f"ft_{kind}_s*/results.json"
        top1 = _top1(root.glob(pattern))
        if not top1:
            continue
        summary[kind] = _stats(top1)
        rows.append(_row(name, top1, knn=knn_of(kind)))
        # further distillation seeds (bench/mini_repro.sh FD_SEEDS): ft_<kind>_d<D>_s<S>
        by_seed = {}
        for run in root.glob(f"ft_{kind}_d*_s*/results.json"):
            d = run.parent.name[len(f"ft_{kind}_d"):].split("_s")[0]
            if d.isdigit():
                by_seed.setdefault(int(d), []).append(run)
        if not by_seed or kind == "scratch":
            continue
        groups = {"first": top1} | {f"d{d}": _top1(runs) for d, runs in sorted(by_seed.items())}
        for d, values in groups.items():
            if d != "first":
                rows.append(_row(f"{name}, distillation seed {d[1:]}", values, knn=knn_of(kind, f"_{d}")))
        pooled = [t for values in groups.values() for t in values]
        means = [statistics.mean(values) for values in groups.values()]
        summary[kind] |= {"by_distillation_seed": {d: _stats(v) for d, v in groups.items()},
                          "all_distillation_seeds": _stats(pooled),
                          "std_of_distillation_means": statistics.stdev(means)}
        rows.append(_row(f"{name}, all {len(groups)} distillation seeds pooled", pooled,
                         f" (std of the distillation means {statistics.stdev(means):.2f})"))
    teacher_json = root / "teacher" / "results.json"
    if teacher_json.exists():
        summary["teacher_before_ft"] = json.loads(teacher_json.read_text())["final"]["top1"]
    cnn_json = root / "teacher_cnn" / "results.json"
    if cnn_json.exists():
        summary["teacher_cnn"] = json.loads(cnn_json.read_text())["final"]["top1"]
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
    print("| model | val top-1 per seed (%) | mean +- std | k-NN top-1 before fine-tuning (%) |\n|---|---|---|---|")
    print("\n".join(rows))
    if "teacher_before_ft" in summary:
        print(f"\nteacher after its own supervised training: {summary['teacher_before_ft']:.2f}%")
    if "teacher_cnn" in summary:
        print(f"CNN teacher after its own supervised training: {summary['teacher_cnn']:.2f}%")
    print(f"stage times (s): {times}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/mini_repro")
