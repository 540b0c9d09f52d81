"""gpu_check.sh's summary: every step's status, the versions, the CUDA tests, the throughput rows, the
short train run on JPEGs (its steady img/s, also as a fraction of the model-only step's) and the profile, in one file (OUT_DIR/gpu_check.json); its last line printed is a one-line verdict.

    python bench/gpu_report.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

THROUGHPUT_KEYS = ("config", "task", "attention", "precision", "batch", "img_per_s", "step_s_median", "flops_per_step",
                   "mfu_datasheet", "datasheet_peak_flops_per_s", "fraction_of_peak", "matmul_peak_flops_per_s",
                   "peak_step_memory_bytes", "speedup_vs_timm", "warmup_seconds", "device_name")
# the steps a check on a GPU must have run with exit status 0 (the wheel install is optional)
REQUIRED_STEPS = ("env", "jpegs", "cuda_tests", "train", "profile", "throughput")


def json_lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def cuda_test_cases(xml: Path) -> list:
    cases = []
    if not xml.exists():
        return cases
    for case in ET.parse(xml).getroot().iter("testcase"):
        status, detail = "passed", None
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                status, detail = name, (node.get("message") or "")[:500]
                break
        cases.append({"test": case.get("name"), "status": status, "seconds": float(case.get("time", 0)),
                      **({"detail": detail} if detail is not None else {})})
    return cases


def train_summary(log_file: Path) -> dict | None:
    log = [r for r in json_lines(log_file) if "loss" in r]
    if not log:
        return None
    tail = log[len(log) // 2:]  # steady state: the second half of the logged steps
    return {"steps": log[-1]["step"], "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
            "img_per_s_steady": sum(r["img_per_s"] for r in tail) / len(tail),
            "mfu_steady": (sum(r.get("mfu") or 0 for r in tail) / len(tail)) or None}


def profile_summary(profile_file: Path) -> list | None:
    """Per profiled configuration: device ms per step and the share of each kind of kernel."""
    if not profile_file.exists():
        return None
    return [{"config": c["config"], "device_ms_per_step": c["device_ms_per_step"],
             "groups_fraction": c["groups_fraction"]} for c in json.loads(profile_file.read_text())["configs"]]


def model_step_row(rows: list) -> dict | None:
    """The throughput row of the step train.py runs: fd_ref's eager FD step with the default kernel (the
    ``optimised`` row, or with one row per kernel the one ``auto`` picks: flex on a GPU, sdpa on the CPU)."""
    auto = "flex" if any(str(r.get("device", "")).startswith("cuda") for r in rows) else "sdpa"
    return next((r for r in rows if r.get("config") in ("optimised", f"optimised {auto}")), None)


def build_report(out: Path) -> dict:
    steps = json_lines(out / "steps.jsonl")
    rows = json_lines(out / "throughput.jsonl")
    versions = json.loads((out / "versions.json").read_text()) if (out / "versions.json").exists() else None
    report = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": steps, "versions": versions,
              "cuda_tests": cuda_test_cases(out / "cuda_tests.xml"),
              "throughput": [{k: r.get(k) for k in THROUGHPUT_KEYS} for r in rows],
              "train": train_summary(out / "train_log.jsonl"),
              "profile": profile_summary(out / "profile.json")}
    model_step = model_step_row(rows)
    if report["train"] and model_step:  # the loader's share: 1.0 = train.py runs at the model-only step's rate
        report["train"]["model_step_config"] = model_step["config"]
        report["train"]["model_step_img_per_s"] = model_step["img_per_s"]
        report["train"]["fraction_of_model_step"] = report["train"]["img_per_s_steady"] / model_step["img_per_s"]
    ran = {s["name"]: s for s in steps}
    report["ok"] = all(name in ran and ran[name].get("rc") == 0 for name in REQUIRED_STEPS) and \
        all(s.get("rc") in (0, None) for s in steps)
    report["cuda_tests_passed"] = sum(c["status"] == "passed" for c in report["cuda_tests"])
    report["cuda_tests_failed"] = sum(c["status"] in ("failed", "error") for c in report["cuda_tests"])
    return report


def main(argv: list | None = None) -> dict:
    out = Path((argv if argv is not None else sys.argv[1:])[0])
    report = build_report(out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"ok": report["ok"], "cuda_tests_passed": report["cuda_tests_passed"],
                      "cuda_tests_failed": report["cuda_tests_failed"],
                      "steps": {s["name"]: s.get("rc") for s in report["steps"]}}))
    return report


if __name__ == "__main__":
    main()
