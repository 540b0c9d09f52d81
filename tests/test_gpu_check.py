"""bench/gpu_check.sh's pieces that run on any machine: the version report (bench/versions.py) and the
summary (bench/gpu_report.py) that turns the step records, the JUnit file and the logs into gpu_check.json.
bench/profile_step.py's grouping of kernels. The script itself goes through every step on a CPU with ``GPU_CHECK_DRY=1`` (bench/README.md, "GPU")."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import gpu_report  # noqa: E402
import versions  # noqa: E402


def test_versions_name_each_pinned_package_and_where_it_came_from():
    """Every package requirements.txt pins is in the report, with the file it was imported from."""
    report = versions.collect()
    assert report["packages"]["torch"]["version"] == torch.__version__
    assert report["cuda_available"] == torch.cuda.is_available()
    pinned = [line.split("==")[0] for line in (BENCH.parent / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")]
    for dist in pinned:
        info = report["packages"][dist]
        assert info["version"] is not None, (dist, info)
        assert Path(info["from"]).exists()


def test_versions_report_a_missing_package_instead_of_crashing(monkeypatch):
    monkeypatch.setitem(versions.PACKAGES, "no_such_module_fd_ref", "no-such-dist")
    info = versions.collect()["packages"]["no-such-dist"]
    assert info["version"] is None and "ModuleNotFoundError" in info["error"]


def _write_check(out: Path, steps: list, cases: dict, losses: list) -> None:
    out.mkdir(exist_ok=True)
    (out / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    body = "".join(f'<testcase name="{name}" time="1.5">' + ("" if status == "passed" else
                   f'<{status} message="{status} here"/>') + "</testcase>" for name, status in cases.items())
    (out / "cuda_tests.xml").write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    (out / "train_log.jsonl").write_text("".join(
        json.dumps({"step": 10 * (i + 1), "loss": loss, "img_per_s": 100.0 + i, "mfu": 0.1 * i}) + "\n"
        for i, loss in enumerate(losses)) + json.dumps({"event": "end"}) + "\n")


STEPS_OK = [{"name": "wheels", "rc": 0}, {"name": "env", "rc": 0}, {"name": "jpegs", "rc": 0},
            {"name": "cuda_tests", "rc": 0}, {"name": "train", "rc": 0}, {"name": "profile", "rc": 0},
            {"name": "throughput", "rc": 0}]


def test_report_counts_tests_and_summarises_the_steady_half_of_the_train_log(tmp_path):
    _write_check(tmp_path, STEPS_OK, {"a": "passed", "b": "passed", "c": "skipped", "d": "failure"},
                 losses=[1.0, 0.8, 0.6, 0.5])
    report = gpu_report.build_report(tmp_path)
    assert report["ok"] is True  # the steps' statuses decide; a failed test shows in cuda_tests_failed
    assert (report["cuda_tests_passed"], report["cuda_tests_failed"]) == (2, 1)
    assert [c["status"] for c in report["cuda_tests"]] == ["passed", "passed", "skipped", "failed"]
    train = report["train"]
    assert (train["steps"], train["first_loss"], train["last_loss"]) == (40, 1.0, 0.5)
    assert train["img_per_s_steady"] == (102.0 + 103.0) / 2           # the second half of the logged steps
    assert abs(train["mfu_steady"] - (0.2 + 0.3) / 2) < 1e-12


def test_report_sets_the_train_run_against_the_model_step_auto_picks(tmp_path):
    """train.py's steady img/s over the eager FD step with the kernel train.py runs (flex on a GPU)."""
    _write_check(tmp_path, STEPS_OK, {"a": "passed"}, losses=[1.0, 0.8, 0.6, 0.5])
    rows = [{"config": "optimised sdpa", "device": "cuda", "img_per_s": 150.0},
            {"config": "optimised flex", "device": "cuda", "img_per_s": 125.0},
            {"config": "compiled flex", "device": "cuda", "img_per_s": 200.0}]
    (tmp_path / "throughput.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = gpu_report.build_report(tmp_path)["train"]
    assert train["model_step_config"] == "optimised flex"
    assert train["fraction_of_model_step"] == (102.0 + 103.0) / 2 / 125.0
    (tmp_path / "throughput.jsonl").write_text(json.dumps(dict(rows[0], device="cpu")) + "\n")
    assert gpu_report.build_report(tmp_path)["train"]["model_step_config"] == "optimised sdpa"


def test_report_is_not_ok_when_a_step_failed_timed_out_or_never_ran(tmp_path):
    for steps in ([dict(s, rc=124) if s["name"] == "throughput" else s for s in STEPS_OK],
                  [s for s in STEPS_OK if s["name"] != "train"],
                  [dict(s, rc=1) if s["name"] == "wheels" else s for s in STEPS_OK]):
        _write_check(tmp_path, steps, {"a": "passed"}, losses=[1.0])
        assert gpu_report.build_report(tmp_path)["ok"] is False
    skipped_wheels = [{"name": "wheels", "rc": None, "skipped": "no wheels"}] + STEPS_OK[1:]
    _write_check(tmp_path, skipped_wheels, {"a": "passed"}, losses=[1.0])
    assert gpu_report.build_report(tmp_path)["ok"] is True  # carrying wheels is optional


def test_report_main_writes_the_json_and_a_one_line_verdict(tmp_path):
    _write_check(tmp_path, STEPS_OK, {"a": "passed"}, losses=[1.0, 0.9])
    result = subprocess.run([sys.executable, str(BENCH / "gpu_report.py"), str(tmp_path)], capture_output=True,
                            text=True, check=True)
    verdict = json.loads(result.stdout.strip().splitlines()[-1])
    assert verdict["ok"] is True and verdict["steps"]["throughput"] == 0
    assert json.loads((tmp_path / "gpu_check.json").read_text())["cuda_tests_passed"] == 1


def test_gpu_check_keeps_its_outputs_flat_and_few():
    """What a device's $OUT sends back: at most 8 plain files, none in a sub-folder."""
    script = (BENCH / "gpu_check.sh").read_text()
    written = {"gpu_check.json", "gpu_check.log", "steps.jsonl", "versions.json", "cuda_tests.xml",
               "throughput.jsonl", "train_log.jsonl", "profile.json"}
    for name in written:
        assert f"$OUT/{name}" in script or name == "gpu_check.json"
    assert len(written) <= 8
    assert '--output "$WORK/train"' in script  # checkpoints stay out of OUT_DIR


def test_profile_groups_kernels_by_what_they_do():
    import profile_step
    cases = {"sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize": "matmul", "aten::addmm": "matmul",
             "pytorch_flash::flash_fwd_kernel": "attention", "fmha_cutlassB_bf16_aligned_64x64_k64": "attention",
             "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
             "multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer", "aten::_fused_adamw_": "optimizer",
             "vectorized_layer_norm_kernel": "normalisation", "aten::native_layer_norm_backward": "normalisation",
             "cunn_SoftMaxForward": "softmax", "aten::_softmax_backward_data": "softmax",
             "aten::gelu_backward": "elementwise", "triton_poi_fused_add_mul_0": "elementwise",
             "aten::copy_": "copy/cast", "something_unheard_of": "other"}
    for name, group in cases.items():
        assert profile_step.group_of(name) == group, name


def test_profile_of_a_tiny_step_adds_up(tmp_path):
    """On the CPU: the groups' shares add to 1, and their times to the step's total."""
    import profile_step
    out = tmp_path / "profile.json"
    reports = profile_step.main(["--device", "cpu", "--student", "vit_tiny", "--teacher", "vit_tiny",
                                 "--img-size", "32", "--batch", "2", "--steps", "1", "--precision", "fp32",
                                 "--json", str(out)])
    (report,) = reports
    assert report["device_ms_per_step"] > 0
    assert abs(sum(report["groups_fraction"].values()) - 1) < 1e-9
    assert abs(sum(report["groups_ms_per_step"].values()) - report["device_ms_per_step"]) < 1e-6
    assert report["groups_ms_per_step"]["matmul"] > 0 and report["groups_ms_per_step"]["optimizer"] > 0
    assert json.loads(out.read_text())["configs"][0]["config"] == "optimised"
