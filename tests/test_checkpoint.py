"""Spec tests of checkpoint I/O (atomic save, safe load, readable errors), state-dict helpers and the
expansion of the shared relative position bias for fine-tuning."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from fd_ref.checkpoint.keys import expand_shared_rpb
from fd_ref.checkpoint.io import load_file, load_weights, model_state, remove_stale_temporaries, save_atomic
from fd_ref.errors import UserError
from fd_ref.models.vit import VisionTransformer


class Evil:
    """Unpickling this would call print("pwned"): a harmless stand-in for code execution."""

    def __reduce__(self):
        return (print, ("pwned",))


def _blob():
    gen = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(3, 4, generator=gen), "b": torch.arange(5)}, "epoch": 7,
            "lr": 1e-3, "name": "fd", "history": [1.0, 0.5]}


def test_save_atomic_load_round_trip(tmp_path):
    blob = _blob()
    path = tmp_path / "sub" / "ckpt.pth"  # the folder is created
    save_atomic(blob, path)
    back = load_file(path)
    assert back.keys() == blob.keys()
    assert torch.equal(back["model"]["w"], blob["model"]["w"])
    assert torch.equal(back["model"]["b"], blob["model"]["b"])
    assert back["epoch"] == 7 and back["lr"] == 1e-3 and back["name"] == "fd" and back["history"] == [1.0, 0.5]
    assert sorted(os.listdir(path.parent)) == ["ckpt.pth"]  # no temporary left behind


def test_save_atomic_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_atomic({"w": torch.ones(2)}, path)
    class Unpicklable:
        def __reduce__(self):
            raise TypeError("this object cannot be pickled")

    with pytest.raises(TypeError, match="this object cannot be pickled"):  # the serialiser's own error
        save_atomic({"w": torch.zeros(2), "bad": Unpicklable()}, path)
    assert torch.equal(load_file(path)["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / ".ckpt.pth.abc.tmp").write_bytes(b"half")
    (tmp_path / "ckpt.pth").write_bytes(b"keep")
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]


def test_truncated_and_garbage_files_raise_user_error(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_atomic({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_file(path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError):
        load_file(garbage)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(UserError):
        load_file(empty)
    with pytest.raises(UserError, match="does not exist"):
        load_file(tmp_path / "missing.pth")


def test_safetensors_round_trip_and_corruption(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.arange(4)}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    back = load_file(path)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(UserError):
        load_file(path)


def test_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(UserError, match="refused"):
        load_file(path)
    assert "pwned" not in capsys.readouterr().out  # nothing was executed


def test_model_state_unwraps_and_strips_prefixes():
    t = torch.zeros(2)
    assert model_state({"model": {"module.blocks.0.w": t}}).keys() == {"blocks.0.w"}
    assert model_state({"state_dict": {"_orig_mod.norm.weight": t}}).keys() == {"norm.weight"}
    assert model_state({"student.patch_embed.proj.weight": t}).keys() == {"patch_embed.proj.weight"}
    # stacked prefixes (DDP around compile around the FD wrapper) all go
    assert model_state({"module._orig_mod.student.cls_token": t}).keys() == {"cls_token"}
    assert model_state({"model": {"student.head.bias": t}, "epoch": 1}).keys() == {"head.bias"}
    # a prefix only counts at the start of a key
    assert model_state({"blocks.0.module.w": t}).keys() == {"blocks.0.module.w"}
    assert model_state({"model": {"w": t}})["w"] is t
    with pytest.raises(UserError):
        model_state({"epoch": 3, "note": "no tensors"})
    with pytest.raises(UserError):
        model_state([t])


def _tiny(pos_embed="shared_rpb", seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                             pos_embed=pos_embed)


def test_load_weights_shape_mismatch_raises():
    model = _tiny()
    state = dict(model.state_dict())
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(UserError, match="another architecture"):
        load_weights(model, state)


def test_load_weights_summary_names_missing_and_unexpected():
    model = _tiny()
    source = _tiny(seed=5)
    state = dict(source.state_dict())
    del state["norm.weight"]
    state["extra.thing"] = torch.zeros(1)
    summary = load_weights(model, state, what="student")
    assert "missing" in summary and "norm.weight" in summary
    assert "unexpected" in summary and "extra.thing" in summary
    assert torch.equal(model.cls_token, source.cls_token)  # the rest was loaded
    clean = load_weights(_tiny(), source.state_dict())
    assert "missing" not in clean and "unexpected" not in clean
    # ignored keys are dropped silently, even with a wrong shape
    quiet = load_weights(_tiny(), {**source.state_dict(), "head.weight": torch.zeros(7, 7)},
                         ignore=(r"head\..*",))
    assert "head" not in quiet
    with pytest.raises(UserError, match="shares no parameter"):
        load_weights(_tiny(), {"something.else": torch.zeros(1)})


def test_expand_shared_rpb_keys_and_copies():
    model = _tiny()
    state = model.state_dict()
    out = expand_shared_rpb(state, depth=2)
    assert "rel_pos_bias.table" not in out
    for i in range(2):
        t = out[f"blocks.{i}.attn.rel_pos_bias.table"]
        assert torch.equal(t, state["rel_pos_bias.table"])
    # independent copies: fine-tuning lets them diverge
    assert out["blocks.0.attn.rel_pos_bias.table"].data_ptr() != out["blocks.1.attn.rel_pos_bias.table"].data_ptr()
    assert "rel_pos_bias.table" in state  # the input is left alone
    no_table = {"w": torch.zeros(1)}
    assert expand_shared_rpb(no_table, depth=2) == no_table


def test_expanded_state_gives_the_same_features():
    shared = _tiny("shared_rpb", seed=1).eval()
    with torch.no_grad():
        shared.rel_pos_bias.table.normal_()
    per_block = _tiny("rpb", seed=2).eval()
    per_block.load_state_dict(expand_shared_rpb(shared.state_dict(), depth=2), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = shared.forward_features(x), per_block.forward_features(x)
        assert (a - b).abs().max().item() <= 1e-6
        # the bias matters: zeroing the expanded tables changes the features
        for block in per_block.blocks:
            block.attn.rel_pos_bias.table.zero_()
        assert (shared.forward_features(x) - per_block.forward_features(x)).abs().max() > 1e-4


def test_save_and_reload_a_model_through_wrapper_prefixes(tmp_path):
    model = _tiny(seed=3)
    wrapped = nn.Module()
    wrapped.student = model
    path = tmp_path / "fd.pth"
    save_atomic({"model": wrapped.state_dict()}, path)
    fresh = _tiny(seed=4)
    summary = load_weights(fresh, model_state(load_file(path)))
    assert "missing" not in summary and "unexpected" not in summary
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
