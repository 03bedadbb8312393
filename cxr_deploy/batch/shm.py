"""``--preprocess-on device``: the stored samples go from a decode worker to the main process through
a ring of reused shared-memory slots, with only a small header pickled through the pool's pipe.

Why (``python benchmarks/batch_profile.py --transfer-only``, shared 2-core VM, load ~4.5, median ms
per image over 4 runs, the worker making the array and the main process's copy-out into a reused
buffer included): 1024² uint8 pickled through the pipe 2.4-3.2, through a slot 0.4-0.9; 2048²
uint16 pickled 25-33, through a slot 1.9-2.0 (1.2-1.7 read in place, as the CPU stager does). The
pipe moves the bytes in 64 KiB chunks through the pool's result thread; a reused slot is one memcpy
in the worker into pages already mapped in both processes (a fresh block costs page faults: 11 ms
for the first 8 MiB written, 0.6 ms the next times), hence slots are reused and stay mapped.

- Main process (:class:`ShmRing`): a fixed ring of ``slots`` blocks named ``cxr-deploy-<pid>-<random>-<i>``,
  created lazily (a short run makes as many as it has files in flight), each handed to one decode
  task at a time and freed once its pixels are staged (or the task came back without pixels in it).
- Slot size: ``min(2 bytes × max_pixels, 64 MiB)``, *sparse*: ``/dev/shm`` is a tmpfs, so a block
  costs memory only for the pages written (a slot's high-water mark: the largest image it carried),
  about what pickled results in flight cost the main process before. 64 MiB holds any CR/DX
  detector at 16 bits (43 cm at 100 µm ≈ 4300² = 35 MiB); bigger or unusual arrays (16-bit RGB) are
  pickled, and ``Decoded.transfer`` says why. Growing slots on demand would need new names and a
  hand-over of blocks that may still be mapped by workers; a sparse fixed size needs neither.
- A full tmpfs (Docker's 64 MiB ``/dev/shm``) must not kill a worker with SIGBUS on its first write
  into a sparse page: the worker reserves the pages with ``posix_fallocate`` first (ENOSPC → that
  image is pickled).
- Lifetime: the blocks are unlinked by :meth:`ShmRing.close` (the runner's ``finally``: normal end,
  errors, Ctrl-C/SIGTERM turned into ``KeyboardInterrupt``). After ``kill -9`` of the main process,
  multiprocessing's resource tracker, which outlives it and with which the blocks were registered at
  creation, unlinks them once the workers are gone too (checked on CPython 3.11:
  ``tests/batch/test_batch_shm.py``).
- Workers attach with ``shm_open`` + ``mmap`` directly, never through ``SharedMemory(name=...)``: on
  Python < 3.13 that registers the block with the resource tracker, which a spawned worker *shares*
  with the main process; the usual remedy, unregistering right after, then removes the main
  process's own registration (the tracker keeps a set of names), and the block survives a
  ``kill -9`` of the main process (checked: left in ``/dev/shm``).
- Recovery: a hung or crashed pool is killed (:mod:`.pool`) before its tasks are resubmitted with
  the same slots, so no old worker can still write into a slot handed to another file.

The worker half (:func:`decode_to_slot`) imports no torch; neither does the ring.
"""

from __future__ import annotations

import os
import secrets
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .decode import DecodeConfig, Decoded, decode_file

PREFIX = "cxr-deploy"
MAX_SLOT_BYTES = 64 << 20
DISABLE_ENV = "CXR_DEPLOY_SHM"  # "0": pickle the stored samples through the pipe, as before


@dataclass(frozen=True)
class ShmTarget:
    """Sent with a decode task: where the worker may put the stored samples."""

    name: str
    index: int
    capacity: int


@dataclass(frozen=True)
class ShmPixels:
    """Sent back instead of the samples: what is in slot ``index``."""

    index: int
    shape: tuple
    dtype: str


# -- worker side ----------------------------------------------------------------------------------
_ATTACHED: dict[str, tuple[int, object]] = {}  # block name -> (fd, mmap), for the worker's life


def decode_to_slot(path: str, target: ShmTarget, config: DecodeConfig | None = None) -> Decoded:
    """:func:`~cxr_deploy.batch.decode.decode_file`, with the stored samples written into the slot."""
    result = decode_file(path, config)
    if result.stored is not None:
        result.transfer = _write(result, target)
    return result


def _write(result: Decoded, target: ShmTarget) -> str:
    stored = result.stored
    dtype = stored.dtype.newbyteorder("=")
    nbytes = stored.size * dtype.itemsize
    if dtype.hasobject or nbytes > target.capacity:
        return f"pickled: {nbytes:,} bytes of {dtype} do not fit a {target.capacity:,}-byte slot"
    try:
        fd, buf = _attach(target.name)
        if hasattr(os, "posix_fallocate") and os.fstat(fd).st_blocks * 512 < nbytes:
            os.posix_fallocate(fd, 0, nbytes)  # writes start at 0, so the reserved part is a prefix
        np.copyto(np.ndarray(stored.shape, dtype, buffer=buf), stored)
    except OSError as exc:
        return f"pickled: shared memory unavailable ({exc.strerror or exc})"
    result.stored, result.shm = None, ShmPixels(target.index, tuple(stored.shape), dtype.str)
    return "shm"


def _attach(name: str):
    import mmap

    # CPython's private module behind multiprocessing.shared_memory, for shm_open without the
    # resource-tracker registration that SharedMemory(name=...) makes before Python 3.13 (see the
    # module docstring; 3.13's SharedMemory(track=False) is the public replacement once it is the
    # floor). tests/test_private_apis.py fails if its shm_open changes.
    import _posixshmem

    if name not in _ATTACHED:
        if len(_ATTACHED) >= 1024:  # blocks of finished runs (an API caller's long-lived process)
            _detach_all()
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        try:
            _ATTACHED[name] = fd, mmap.mmap(fd, os.fstat(fd).st_size)
        except OSError:
            os.close(fd)
            raise
    return _ATTACHED[name]


def _detach_all() -> None:
    for fd, buf in _ATTACHED.values():
        buf.close()
        os.close(fd)
    _ATTACHED.clear()


# -- main process ---------------------------------------------------------------------------------
def shm_supported() -> bool:
    if os.environ.get(DISABLE_ENV, "1") == "0" or os.name != "posix":
        return False
    try:
        import _posixshmem  # noqa: F401
    except ImportError:
        return False
    return True


def open_ring(pool, slots: int, max_pixels: int) -> "ShmRing | None":
    """The ring for a run, or None when nothing would use it: the workers send the resized gray
    (``--preprocess-on workers``), decode runs in this process (``workers=0``), or no POSIX shm."""
    if pool.config.send != "stored" or not pool.workers or not shm_supported():
        return None
    return ShmRing(slots, max(1 << 20, min(2 * max_pixels, MAX_SLOT_BYTES)))


class ShmRing:
    def __init__(self, slots: int, slot_bytes: int):
        self.prefix = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.slots, self.slot_bytes = slots, slot_bytes
        self._blocks: dict = {}  # index -> SharedMemory, created on first use
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out the lowest index first
        self.stats: Counter = Counter()  # how the stored samples travelled

    @property
    def held(self) -> int:
        return self.slots - len(self._free)

    def acquire(self) -> ShmTarget | None:
        """A free slot for one decode task, or None (the task then pickles its samples)."""
        if not self._free:
            self.stats["pickled: no free slot"] += 1
            return None
        index = self._free.pop()
        block = self._blocks.get(index)
        if block is None:
            from multiprocessing import shared_memory

            try:  # registered with the resource tracker: unlinked by it if this process is killed
                block = shared_memory.SharedMemory(f"{self.prefix}-{index}", create=True, size=self.slot_bytes)
            except OSError as exc:
                self._free.append(index)
                self.stats[f"pickled: cannot create a shared-memory block ({exc.strerror or exc})"] += 1
                return None
            self._blocks[index] = block
        return ShmTarget(block.name.lstrip("/"), index, self.slot_bytes)

    def release(self, index: int) -> None:
        if index not in self._free:
            self._free.append(index)

    def settle(self, target: ShmTarget | None, result: Decoded | None) -> ShmTarget | None:
        """Called once a task's result is in hand: frees the slot unless the result's pixels are in
        it; returns the target still held (or None)."""
        if result is not None and target is not None:
            self.stats["shm" if result.shm is not None else "pickled" if result.stored is not None else "none"] += 1
        if target is not None and (result is None or result.shm is None):
            self.release(target.index)
            return None
        return target

    def view(self, pixels: ShmPixels) -> np.ndarray:
        """The samples in a slot, without copying (valid until the slot is released)."""
        return np.ndarray(pixels.shape, np.dtype(pixels.dtype), buffer=self._blocks[pixels.index].buf)

    def close(self) -> None:
        """Unlink every block (idempotent). Workers still mapping one keep their pages until they exit."""
        for block in self._blocks.values():
            try:
                block.close()
            except BufferError:  # a view still exported somewhere; the name goes anyway
                pass
            try:
                block.unlink()
            except FileNotFoundError:
                pass
        self._blocks.clear()
        self._free = list(range(self.slots - 1, -1, -1))
