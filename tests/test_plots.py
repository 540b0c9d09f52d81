"""analyze.py --log: training curves (loss and lr against step, and validation top-1 when a run has it)
drawn from log.jsonl, several runs side by side; bad input is one error, nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import analyze
from fd_ref.errors import UserError
from fd_ref.analysis.plots import series, draw_training_curves, read_run


def _write_log(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _train_records(n: int) -> list[dict]:
    return [{"step": s, "epoch": 0, "loss": 1.0 / s, "lr": 1e-3 * s / n, "grad_norm": 1.0, "img_per_s": 10.0}
            for s in range(1, n + 1)]


def test_curves_of_two_runs_side_by_side(tmp_path):
    a = _write_log(tmp_path / "fd", _train_records(5))
    b = _write_log(tmp_path / "ft", _train_records(4) + [{"step": 4, "epoch": 0, "top1": 40.0, "top5": 90.0,
                                                          "val_loss": 2.0}])
    analyze.main(["--log", str(a), f"finetuned={b}", "--output", str(tmp_path / "out"), "--dpi", "50"])
    png = tmp_path / "out" / "training_curves.png"
    with Image.open(png) as image:
        width, height = image.size
    assert (width, height) == (round(3 * 4.2 * 50), round(3.4 * 50))  # loss, lr and top-1 panels
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["training_curves.png"]  # no diagnostics


def test_two_panels_without_evaluations(tmp_path):
    run = read_run(str(_write_log(tmp_path / "fd", _train_records(3))))
    path = draw_training_curves([run], tmp_path / "c.png", dpi=50)
    with Image.open(path) as image:
        assert image.size[0] == round(2 * 4.2 * 50)


def test_series_keep_training_records_in_step_order(tmp_path):
    label, records = read_run(f"mine={_write_log(tmp_path / 'x', _train_records(4))}")
    assert label == "mine"
    steps, losses = series(records, "loss")
    assert steps == [1, 2, 3, 4] and losses == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert read_run(str(tmp_path / "x" / "log.jsonl"))[0] == "x"  # a log.jsonl path, labelled by its folder


def test_bad_logs_are_one_error_and_write_nothing(tmp_path):
    with pytest.raises(UserError, match="has no log.jsonl"):
        analyze.main(["--log", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match="line 1 is not JSON"):
        analyze.main(["--log", str(tmp_path / "bad"), "--output", str(tmp_path / "out")])
    _write_log(tmp_path / "empty", [{"step": 1, "top1": 3.0}])
    with pytest.raises(UserError, match="no training steps"):
        analyze.main(["--log", str(tmp_path / "empty"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
