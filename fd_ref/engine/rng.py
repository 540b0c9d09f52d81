"""Every random state a run draws from (torch, CUDA, NumPy, Python), captured and restored for exact resume,
and converted to tensors and plain lists so that checkpoint.pt loads with ``weights_only=True``."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_to_safe(state: dict[str, Any]) -> dict[str, Any]:
    """RNG states as tensors / plain lists only, so the checkpoint loads with weights_only=True."""
    np_state = state["numpy"]
    py_version, py_state, py_gauss = state["python"]
    out = {"torch": state["torch"],
           "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
           "python": [py_version, list(py_state), py_gauss]}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def rng_from_safe(state: dict[str, Any]) -> dict[str, Any]:
    np_state = state["numpy"]
    out = {"torch": state["torch"],
           "numpy": (np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]),
           "python": (state["python"][0], tuple(state["python"][1]), state["python"][2])}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out
