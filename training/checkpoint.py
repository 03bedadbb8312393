"""The resume checkpoint (``RUN_DIR/last.pt``): written atomically after every epoch, loaded only
with ``weights_only=True``, with every RNG's state so ``--resume`` continues exactly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from cxr_deploy import atomic

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "cxr-deploy-train-checkpoint"


def rng_state() -> dict:
    """Global RNG states as plain lists/tensors (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    with atomic.temp_for(path) as tmp:  # a kill during the save leaves the previous checkpoint intact
        torch.save(payload, tmp)


def load_checkpoint(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a cxr-deploy training checkpoint")
    return ckpt

