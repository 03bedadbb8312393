"""What a batch run is asked to do (:class:`BatchConfig`) and what it reports (:class:`BatchSummary`,
exit codes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..eligibility import DEFAULT_FILTER, ChestFilter
from ..imaging import DEFAULT_MAX_PIXELS
from ..pacs.uids import DEFAULT_UID_ROOT

EXIT_OK = 0
EXIT_FATAL = 2
EXIT_SOME_FAILED = 3
# Finished, but outputs are missing: an overlay or DICOM result (SR/SC) that could not be written
# (the row's error says why; --resume writes them), or the report. Wins over 3: the fix is the same
# for both (read the error column), and a full disk must not pass for a few bad files.
EXIT_OUTPUTS_MISSING = 4
EXIT_INTERRUPTED = 130
INTERRUPTED_NOTE = "INTERRUPTED: rows written so far are complete; rerun the same command with --resume"


@dataclass
class BatchConfig:
    inputs: Sequence[str]
    model: str | Path
    out: str | Path
    backend: str = "onnx"
    device: str = "auto"
    batch_size: int = 16
    workers: int | None = None  # decode processes; None = auto, 0 = decode in this process
    threads: int | None = None  # inference threads on CPU; None = all cores
    cam_dir: str | Path | None = None
    cam_for: str = "all"  # a CamFor value
    cam_format: str = "png"  # "png" | "jpeg"
    threshold: float | None = None  # None = the bundle's threshold (or operating_point's)
    operating_point: str | None = None  # a named threshold of the bundle (sens95 ...); not with threshold
    shard: tuple[int, int] = (0, 1)  # (index, count), index 0-based
    resume: bool = False
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True
    fsync: bool = True
    decode_timeout: float | None = 120.0  # seconds per file; None or 0 = wait forever
    eligibility: ChestFilter = DEFAULT_FILTER  # which DICOMs are scored (see cxr_deploy.eligibility)
    dicom_out: str | Path | None = None  # write a DICOM SR + SC per scored DICOM input here
    uid_root: str = DEFAULT_UID_ROOT  # root of the UIDs of those objects (see cxr_deploy.pacs.uids)
    create_dirs: bool = False  # create missing parent folders of --out / --cam-dir
    preprocess_on: str | None = None  # "workers" | "device"; None = device when the model runs on CUDA


@dataclass
class BatchSummary:
    out: str
    counts: dict = field(default_factory=lambda: {"ok": 0, "error": 0, "skipped": 0})
    previous: dict = field(default_factory=lambda: {"ok": 0, "error": 0, "skipped": 0})
    seconds: float = 0.0
    backend: str = ""
    model_id: str = ""
    cam_dir: str | None = None
    overlays: int = 0
    dicom_results: int = 0
    dicom_out: str | None = None
    interrupted: bool = False
    missing_outputs: int = 0  # rows whose overlay or DICOM result could not be written
    outside_population: int = 0  # scored rows with in_population "no" (cxr_deploy.in_population)
    transfers: dict = field(default_factory=dict)  # --preprocess-on device: how stored samples travelled

    @property
    def processed(self) -> int:
        return sum(self.counts.values())

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.missing_outputs:
            return EXIT_OUTPUTS_MISSING
        return EXIT_SOME_FAILED if self.counts["error"] or self.previous["error"] else EXIT_OK

    def lines(self) -> list[str]:
        c, p = self.counts, self.previous
        out = [f"{self.processed} inputs processed in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s, "
               f"backend {self.backend}, model {self.model_id}): {c['ok']} ok, {c['error']} error, {c['skipped']} skipped"]
        if sum(p.values()):
            out.append(f"already in the CSV from an earlier run (skipped by --resume): {p['ok']} ok, "
                       f"{p['error']} error, {p['skipped']} skipped")
        out.append(f"results: {self.out}")
        if self.cam_dir:
            out.append(f"overlays: {self.overlays} images in {self.cam_dir}")
        if self.dicom_out:
            out.append(f"DICOM results: {self.dicom_results} SR + SC pairs in {self.dicom_out}")
        if self.outside_population:
            out.append(f"outside the training population: {self.outside_population} of {c['ok']} scored images "
                       "(in_population = no; population_reason says why): scored, less reliable")
        if self.missing_outputs:
            out.append(f"OUTPUTS MISSING: {self.missing_outputs} rows have no overlay or DICOM result (their error "
                       "column says why); fix the cause and rerun with --resume to write them")
        if self.interrupted:
            out.append(INTERRUPTED_NOTE)
        return out
