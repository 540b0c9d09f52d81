"""One way to rebuild a model from a file (fd_ref.models.from_file), the same rule from every entry point.

The same odd files (a model_config key this version does not know, a missing tensor, an unexpected tensor, a
tensor of another shape) go to every command that reads a model file: ``finetune.py --pretrained``,
``--linear-probe`` and ``--eval-only``, ``analyze.py``, ``export.py`` and ``train.py --teacher-checkpoint``
(an fd-ref file as the teacher). Each refuses with exit code 2 and one line, the same line everywhere, and
writes nothing. A sound file goes through every one of them, and an older file (a model_config without
keys today's version records) is read alike by all.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustness_helpers import (
    FINETUNE,
    TRAIN,
    assert_user_error,
    close_launcher_per_module,  # noqa: F401 - the autouse fixture: one launcher per module, closed at its end
    run,
)

from fd_ref.errors import UserError
from fd_ref.models.from_file import build_model, read_model_file
from fd_ref.models.vit import create_vit


def entry_points(path: Path, out: Path) -> dict[str, tuple[str, list]]:
    """Every command that rebuilds a model from ``path``, writing (if at all) under ``out``."""
    return {
        "finetune --pretrained": ("finetune.py", [*FINETUNE, "--pretrained", path, "--max-steps", "1",
                                                  "--output", out / "ft"]),
        "finetune --linear-probe": ("finetune.py", [*FINETUNE, "--pretrained", path, "--linear-probe",
                                                    "--max-steps", "1", "--output", out / "lp"]),
        "finetune --eval-only": ("finetune.py", [*FINETUNE, "--eval-only", "--pretrained", path]),
        "analyze": ("analyze.py", ["--models", f"m={path}", "--num-images", "4", "--landscape-steps", "3",
                                   "--num-workers", "0", "--progress", "false", "--output", out / "analysis"]),
        "export": ("export.py", [path, out / "export"]),
        "train --teacher-checkpoint": ("train.py", [*TRAIN, "--teacher-checkpoint", path, "--max-steps", "1",
                                                    "--output", out / "fd"]),
    }


def classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_vit("vit_tiny", img_size=32, patch_size=16, depth=1, embed_dim=64, num_heads=2,
                      num_classes=10, global_pool="avg")


def save(path: Path, model: torch.nn.Module, state=None, **config) -> Path:
    torch.save({"model": model.state_dict() if state is None else state,
                "model_config": {**model.config, **config}}, path)
    return path


def odd_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the fragment its one line must hold)"""
    model = classifier()
    state = model.state_dict()
    less = {k: v for k, v in state.items() if k != "blocks.0.mlp.fc1.weight"}
    more = {**state, "blocks.0.attn.rope_freqs": torch.zeros(4)}
    wider = {**state, "blocks.0.mlp.fc1.bias": torch.zeros(7)}
    return {
        "unknown key": (save(folder / "unknown_key.pt", model, rope="2d"),
                        "records model_config keys this version of fd_ref does not know: rope='2d'"),
        "missing tensor": (save(folder / "missing.pt", model, less),
                           "does not match the architecture it records (missing blocks.0.mlp.fc1.weight)"),
        "unexpected tensor": (save(folder / "unexpected.pt", model, more),
                              "does not match the architecture it records (unexpected blocks.0.attn.rope_freqs)"),
        "other shape": (save(folder / "shape.pt", model, wider), "1 tensors differ in shape (e.g. blocks.0.mlp.fc1.bias"),
    }


@pytest.mark.parametrize("kind", ["unknown key", "missing tensor", "unexpected tensor", "other shape"])
def test_an_odd_file_gets_the_same_line_from_every_entry_point(kind, tmp_path):
    path, fragment = odd_files(tmp_path)[kind]
    with pytest.raises(UserError, match=fragment.split(" (")[0]):
        read_model_file(path)
    lines = {}
    for name, (script, args) in entry_points(path, tmp_path / "out").items():
        r = run(tmp_path, script, *args, timeout=120)
        lines[name] = assert_user_error(r, fragment, str(path))
    assert len(set(lines.values())) == 1, lines
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.pt")), "a refused file wrote"


def test_a_sound_file_goes_through_every_entry_point(tmp_path):
    path = save(tmp_path / "best.pt", classifier())
    for name, (script, args) in entry_points(path, tmp_path / "out").items():
        r = run(tmp_path, script, *args, timeout=300)
        assert r.rc == 0, f"{name}: exit {r.rc}\n{r.err[-2000:]}"
    rebuilt = build_model(read_model_file(path))
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), classifier().state_dict().values()))


def test_an_older_file_is_read_alike_by_every_entry_point(tmp_path):
    """A model_config without ``layer_scale_init`` (an older version's): today's default (layer scale 0.1)
    builds gammas the file lacks; every reader starts them at init and names them, none refuses."""
    model = classifier()
    state = {k: v for k, v in model.state_dict().items() if ".ls" not in k}
    config = {k: v for k, v in model.config.items() if k != "layer_scale_init"}
    path = tmp_path / "old.pt"
    torch.save({"model": state, "model_config": config}, path)
    mf = read_model_file(path)
    assert mf.missing == ["blocks.0.ls1.gamma", "blocks.0.ls2.gamma"]
    assert "missing (left at init, an older file): blocks.0.ls1.gamma, blocks.0.ls2.gamma" in mf.summary
    rebuilt = build_model(mf)
    assert torch.equal(rebuilt.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight)
    assert torch.all(rebuilt.blocks[0].ls1.gamma == 0.1)
    for name, (script, args) in entry_points(path, tmp_path / "out").items():
        r = run(tmp_path, script, *args, timeout=300)
        assert r.rc == 0, f"{name}: exit {r.rc}\n{r.err[-2000:]}"


def test_written_files_name_no_fd_ref_module(tmp_path):
    """student.pt, checkpoint.pt and best.pt hold tensors and plain containers only: their pickles name no
    fd_ref module, so moving fd_ref's modules (as the layered package did) never breaks a file written before;
    and they load back with ``weights_only=True``."""
    import io
    import pickletools
    import zipfile

    fd, ft = tmp_path / "fd", tmp_path / "ft"
    assert run(tmp_path, "train.py", *TRAIN, "--max-steps", "1", "--output", fd, timeout=300).rc == 0
    assert run(tmp_path, "finetune.py", *FINETUNE, "--pretrained", fd / "student.pt", "--output", ft,
               timeout=300).rc == 0
    for path in (fd / "student.pt", fd / "checkpoint.pt", ft / "best.pt", ft / "checkpoint.pt"):
        with zipfile.ZipFile(path) as z:
            pickle = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        names = {str(arg) for op, arg, _ in pickletools.genops(io.BytesIO(pickle)) if op.name == "GLOBAL"}
        assert names and all(n.split()[0] in ("torch", "torch._utils", "collections") for n in names), (path, names)
        assert b"fd_ref" not in pickle, path
        torch.load(path, map_location="cpu", weights_only=True)
