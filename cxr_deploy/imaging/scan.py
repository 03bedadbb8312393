"""Walking inputs (files and folders) into a deterministic list of candidate files.

- recursive, sorted by path so two runs (and two machines) see the same order;
- hidden files and folders (``.name``) and ``DICOMDIR`` index files are skipped silently;
- symlinks are followed, but each real folder is visited once, so a link loop cannot hang a scan;
- files that are not PNG/JPEG/DICOM by content are reported as ``skipped``, never as failures.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from . import detect


@dataclass(frozen=True)
class ScanEntry:
    path: str
    format: str | None  # "png" | "jpeg" | "dicom"; None when skipped
    skip_reason: str | None = None

    @property
    def skipped(self) -> bool:
        return self.format is None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _classify(path: Path) -> ScanEntry:
    try:
        st = path.stat()
        if st.st_size == 0 or not stat.S_ISREG(st.st_mode):
            # Empty files are candidate inputs that fail to read: reported as errors, not skips.
            # Named pipes and devices are never opened here (a read could block for ever); the
            # reader refuses them with a reason.
            return ScanEntry(str(path), "unknown")
        fmt = detect.sniff_file(path)
    except OSError:
        # Unreadable (permissions, vanished): keep it as a candidate so it gets an error row.
        return ScanEntry(str(path), "unknown")
    if fmt is None:
        return ScanEntry(str(path), None, "not an image (content is not PNG, JPEG or DICOM)")
    return ScanEntry(str(path), fmt)


def _walk(root: Path) -> Iterator[Path]:
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:  # symlink loop or a folder linked twice
            continue
        seen.add(key)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subfolders = []
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                # A symlink loop (ELOOP) or an entry that vanished: still a candidate, so the
                # reader gives it an error row with the reason instead of it silently missing.
                is_dir = False
            if is_dir:
                subfolders.append(Path(entry.path))
            elif not entry.name.upper().startswith("DICOMDIR"):
                yield Path(entry.path)
        stack.extend(reversed(subfolders))  # depth-first, in sorted order


def iter_candidate_files(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Files named directly are yielded as given; folders are walked."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from _walk(path)
        else:
            yield path


def scan_paths(inputs: Iterable[str | Path], *, classify: bool = True) -> Iterator[ScanEntry]:
    """Yield one :class:`ScanEntry` per file, lazily (a folder of a million files is fine)."""
    for path in iter_candidate_files(inputs):
        if not classify:
            yield ScanEntry(str(path), "unknown")
        elif not path.exists():
            yield ScanEntry(str(path), "unknown")  # reading it will give "file not found"
        else:
            yield _classify(path)
