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


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (or SIGTERM, raised as KeyboardInterrupt): where it stands. Still a
    KeyboardInterrupt, so code that catches that keeps working."""

    def __init__(self, run_dir: Path | None, saved_epoch: int | None):
        super().__init__(run_dir, saved_epoch)
        self.run_dir, self.saved_epoch = run_dir, saved_epoch

    def message(self) -> str:
        """One line: the checkpoint and the command that continues it, or that there is none."""
        if self.run_dir is not None and self.saved_epoch:
            return (f"interrupted; saved up to epoch {self.saved_epoch} in {self.run_dir / CHECKPOINT_NAME} "
                    f"(the epoch under way is redone); continue with: cxr-deploy train --resume {self.run_dir}")
        where = f" in {self.run_dir}" if self.run_dir is not None else ""
        return (f"interrupted before the first epoch finished: no checkpoint{where} to resume from; "
                "start again with the same command")


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

