"""Training on several processes: ``torchrun --nproc-per-node N -m cxr_deploy train ...`` (DDP).

torchrun (or any launcher that sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``) starts N copies of the command; :func:`session` notices the variables, joins the
process group (NCCL on CUDA, gloo on the CPU) and leaves it again, also on errors. Without them,
or with ``WORLD_SIZE=1``, nothing here does anything and training is the single-process run.

What stays the same as one process, and how:

- ``--batch-size`` is the *global* batch of one optimizer step; each process loads
  ``batch_size / N`` images of it (:class:`GlobalBatchShard`). Every process draws the order a
  single-process run draws, from the same seeded generator and the same sampler (the class-balancing
  ``WeightedRandomSampler`` included, which ``DistributedSampler`` cannot wrap), and takes an
  interleaved share of each global batch: step k of all processes together is exactly the
  single-process run's batch k. The generator is in ``last.pt``, so ``--resume`` continues the
  order, and no ``set_epoch`` is needed: the generator moves on every epoch by itself.
- validation: each process scores an unpadded ``1/N`` of the validation set (:class:`Shard`;
  ``DistributedSampler`` would pad with repeated images, which would count twice), then
  :meth:`Dist.gather_rows` all-gathers the per-image rows (uneven sizes allowed) and they are put
  back in dataset order, so every process holds the single-process arrays, each image once.
- decisions (early stopping, the plateau schedule) follow rank 0's numbers, broadcast.
- rank 0 alone writes the run folder; the folder checks run on rank 0 and their outcome (or the
  error) is broadcast, so every process stops with the same message.

What differs: BatchNorm statistics in stage 2 are per process (``batch_size / N`` images) unless
``--sync-bn`` (CUDA only: PyTorch's SyncBatchNorm has no CPU implementation); stage 1 keeps
BatchNorm frozen, so it matches a single process to float rounding.
"""

from __future__ import annotations

import gc
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import Sampler

from .devices import resolve_device

TIMEOUT_ENV = "CXR_DDP_TIMEOUT_S"
# A collective waits this long for a missing process before raising. It must outlast the longest
# thing rank 0 does alone while the others wait: reading and splitting the data list at the start,
# saving the best bundle after an epoch (seconds), and slow first-epoch data loading on a cold cache.
DEFAULT_TIMEOUT_S = 1800


def launched_world_size() -> int:
    """N when started by torchrun with N processes, else 1 (no torch import needed)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def is_main_process() -> bool:
    """Rank 0, or not distributed at all: the process that logs, prints and writes files."""
    return int(os.environ.get("RANK") or 0) == 0


@dataclass
class Dist:
    """This process's place in the run; every method is a no-op for a single process."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    _previous_wrapper: weakref.ref | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self, batch_size: int, sync_bn: bool) -> dict:
        return {"world_size": self.world_size, "backend": self.backend or "none", "global_batch": batch_size,
                "per_process_batch": batch_size // self.world_size, "sync_bn": bool(sync_bn and self.enabled)}

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def run_on_main(self, fn):
        """``fn()`` on rank 0 only; its result, or the exception it raised, reaches every rank."""
        if not self.enabled:
            return fn()
        outcome, error = None, None
        if self.is_main:
            try:
                outcome = (True, fn())
            except Exception as exc:  # re-raised below, on rank 0 too, after the others heard of it
                outcome, error = (False, _picklable(exc)), exc
        ok, value = self.broadcast(outcome)
        if not ok:
            raise error if error is not None else value
        return value

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over the ranks (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(t)
        return t.tolist()

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows (a 2-D float64 tensor; row counts may differ) stacked in rank order, on
        every rank: all_gather needs equal shapes, so each rank pads to the longest and the padding
        is cut off again with the gathered counts."""
        if not self.enabled:
            return rows
        dev = self._comm_device()
        counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(self.world_size)]
        tdist.all_gather(counts, torch.tensor([len(rows)], dtype=torch.int64, device=dev))
        counts = [int(c) for c in counts]
        padded = torch.zeros((max(counts), rows.shape[1]), dtype=rows.dtype, device=dev)
        padded[: len(rows)] = rows.to(dev)
        parts = [torch.empty_like(padded) for _ in counts]
        tdist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, counts)]).cpu()

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP broadcasts them at the
        start of each training forward, but each rank then updates them with its own share of the
        batch, so after the last step they differ; validated as they were, each rank's shard would
        be scored by a slightly different model than the one rank 0 saves (measured on the tiny test
        run: validation loss 0.7100 recorded vs 0.7080 for the saved weights)."""
        if not self.enabled:
            return
        for buffer in model.buffers():
            tdist.broadcast(buffer.data, src=0)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel over its parameters that train *now*.

        DDP registers its gradient hooks at construction, for the parameters requiring grad then,
        so each stage wraps anew. The previous wrapper must be gone first: a live one would all-reduce
        the head's gradients a second time.
        """
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if self._previous_wrapper is not None:
            gc.collect()  # DDP objects sit in reference cycles; the caller has dropped its reference
            if self._previous_wrapper() is not None:
                raise RuntimeError("internal error: the previous stage's DistributedDataParallel is still alive")
        ids = [self.device.index] if self.device.type == "cuda" else None
        wrapper = DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)
        self._previous_wrapper = weakref.ref(wrapper)
        return wrapper


def _picklable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling (it travels to the other ranks), else a RuntimeError that
    carries its message."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def process_device(name: str, local_rank: int, world_size: int) -> torch.device:
    """``--device`` for this process: under torchrun, CUDA means GPU ``LOCAL_RANK``."""
    device = resolve_device(name)
    if world_size == 1 or device.type != "cuda":
        return device
    if name not in ("auto", "cuda"):
        raise ValueError(f"--device {name}: under torchrun each process uses GPU LOCAL_RANK; use --device cuda "
                         "(or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                         "start at most one process per GPU (--nproc-per-node)")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _timeout() -> timedelta:
    try:
        return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S))
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds") from None


@contextmanager
def session(config) -> Iterator[Dist]:
    """Join the process group for one training run (when launched by torchrun) and leave it.

    Everything checked here fails on every rank alike, before any rank waits on another.
    """
    world = launched_world_size()
    if world == 1:
        yield Dist(resolve_device(config.device))
        return
    local_rank = int(os.environ.get("LOCAL_RANK") or 0)
    device = process_device(config.device, local_rank, world)
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch and must be a multiple of the "
                         f"{world} processes")
    if config.sync_bn and device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation")
    owned = not tdist.is_initialized()  # a script may have joined a group already: leave it to the script
    backend = "nccl" if device.type == "cuda" else "gloo"
    if owned:
        tdist.init_process_group(backend, timeout=_timeout(), device_id=device if backend == "nccl" else None)
    try:
        yield Dist(device, tdist.get_rank(), tdist.get_world_size(), tdist.get_backend())
    finally:
        if owned:
            tdist.destroy_process_group()


class GlobalBatchShard(Sampler):
    """This rank's share of ``base``'s order, global batch by global batch.

    The order is cut to whole global batches when there is more than one (what ``drop_last`` does
    for a single process: a last batch of one image breaks BatchNorm), then rank r takes every
    N-th index from r on: with a per-process batch of ``global_batch / N``, step k of the N ranks
    covers exactly positions ``[k * global_batch, (k + 1) * global_batch)`` of the order.
    """

    def __init__(self, base: Sampler, rank: int, world_size: int, global_batch: int):
        self.base, self.rank, self.world_size, self.global_batch = base, rank, world_size, global_batch

    def _usable(self, n: int) -> int:
        return n - n % self.global_batch if n > self.global_batch else n

    def __iter__(self):
        order = list(self.base)  # draws from the shared generator exactly as a single process does
        return iter(order[: self._usable(len(order))][self.rank:: self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self._usable(len(self.base)), self.world_size))


class Shard(Sampler):
    """Indices ``rank, rank + N, ...`` of ``n``: every image on exactly one rank, none repeated."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))
