"""Python API for PACS scripts.

::

    import cxr_deploy

    model = cxr_deploy.load("bundle/")                   # ONNX Runtime, CUDA if usable
    for record in model.predict(["/exports/IM0001", "/exports/IM0002"]):
        print(record["path"], record["status"], record["probability"], record["predicted_label"])

    summary = cxr_deploy.run_batch(["/exports/today"], model="bundle/", out="results.csv",
                                   resume=True, cam_dir="overlays/")
    sys.exit(summary.exit_code)                          # 0 ok, 3 some inputs unreadable

``predict`` is for a handful of images in-process (decoding in this process, one model call per
``batch_size``, no worker processes); ``run_batch`` is the streaming, resumable ``cxr-deploy batch``
with worker processes. Both are safe in a script without an ``if __name__ == "__main__":`` guard
(the workers never re-run the calling script), though the guard is still good style.
Records use the same keys as the results CSV columns (see :mod:`cxr_deploy.batch.results_file`).

Only frontal chest radiographs are scored: other DICOMs get ``status="skipped"`` and the reason
(see :mod:`cxr_deploy.eligibility`; ``load(..., eligibility=NO_FILTER)`` scores everything).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from . import in_population
from .bundle import ModelBundle
from .decision import check_threshold
from .eligibility import DEFAULT_FILTER, ChestFilter, blank_reason
from .errors import NotAnImage, NotEligible, UnreadableImage
from .imaging import DEFAULT_MAX_PIXELS, read_image
from .imaging.pixel_transforms import rgb_to_gray

__all__ = ["Model", "load", "run_batch"]


class Model:
    """A loaded bundle + backend. Create with :func:`load`."""

    def __init__(self, bundle: ModelBundle, backend, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 eligibility: ChestFilter = DEFAULT_FILTER, decision=None):
        from .run_settings import resolve_decision

        self.bundle = bundle
        self.backend = backend
        self.max_pixels = max_pixels
        self.eligibility = eligibility
        self.decision = decision or resolve_decision(bundle.manifest)  # threshold + operating point
        self.population = in_population.load(bundle)  # None: a bundle without the statistics

    @property
    def spec(self):
        return self.bundle.spec

    @property
    def threshold(self) -> float:
        """The threshold :meth:`predict` decides with: ``load(..., operating_point=/threshold=)``, else the bundle's."""
        return self.decision.threshold

    @property
    def operating_point(self) -> str:
        """Where :attr:`threshold` comes from: a named point, ``custom`` or ``default`` (the bundle's)."""
        return self.decision.operating_point

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.bundle.class_names

    @property
    def positive_class(self) -> str:
        return self.bundle.manifest.positive_class

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    def check_population(self, records):
        """Compare predicted records' population with the bundle's reference (population-shift
        alarm, :mod:`cxr_deploy.population`): ``.differs``, ``.lines()``, ``.record``."""
        from .population import check_rows

        return check_rows(self.bundle, records, self.threshold)

    def __repr__(self) -> str:
        return f"Model({str(self.bundle.directory)!r}, model_id={self.model_id}, backend={self.backend.name})"

    def predict(self, items, *, batch_size: int = 16, threshold: float | None = None,
                return_cam: bool = False) -> list[dict]:
        """Predict for paths and/or arrays; one record (dict) per item, in order, never raising for
        a bad file: unreadable inputs get ``status="error"`` (non-images ``"skipped"``) and a reason.

        Arrays: 2-D gray, float in [0, 1] or integer (scaled by its dtype's maximum), or
        ``(H, W, 3)`` RGB (converted to gray); they must already be display-ready (brighter =
        denser), as :func:`cxr_deploy.read_image` returns. ``return_cam`` adds ``"cam"``, the
        ``(S/32, S/32)`` positive-class map over the model's input square. ``in_population``
        (``"yes"``/``"no"``/None), ``population_reason`` and ``population_score`` say whether the image
        is like the model's training population (:mod:`cxr_deploy.in_population`).
        """
        from .batch.decode import skip_or_error
        from .batch.results_file import image_columns
        from .batch.rows import base_row, new_row, population_cells, score_row, stamp

        if isinstance(items, (str, Path, np.ndarray)):
            items = [items]
        from .run_settings import CUSTOM_POINT, Decision

        decision = self.decision if threshold is None else Decision(check_threshold(threshold), CUSTOM_POINT)
        threshold = decision.threshold
        positive = self.bundle.manifest.positive_index
        base = base_row(decision, self.model_id, self.backend.name)
        records: list[dict] = []
        batch: list[tuple[dict, np.ndarray]] = []

        def flush():
            if not batch:
                return
            x = self.spec.normalize(np.stack([gray for _, gray in batch]))
            probabilities, cams, scores = self.backend(x)
            for i, ((record, _), prob, cam) in enumerate(zip(batch, probabilities, cams)):
                # the rows of every engine are made by batch.rows: a non-finite output is an error row
                if score_row(record, prob, positive, threshold, self.class_names) is None:
                    continue
                population_cells(record, None if scores is None else scores[i], self.population)
                if return_cam:
                    record["cam"] = cam
            batch.clear()

        for i, item in enumerate(items):
            record = new_row(base, None, "ok", None, image_columns(), stamp())
            record.update(probability=None, predicted_label=None, population_score=None, in_population=None,
                          population_reason=None)
            records.append(record)
            try:
                if isinstance(item, np.ndarray):
                    record.update(path=f"<array {i}>", format="array")
                    pixels = _array_to_gray(item)
                    blank = blank_reason(pixels)  # files get this check from the reader
                    if blank:
                        raise ValueError(blank)
                else:
                    record["path"] = str(item)
                    image = read_image(item, max_pixels=self.max_pixels, eligibility=self.eligibility)
                    pixels, meta = image.pixels, image.meta
                    record.update(image_columns(meta))
                batch.append((record, self.spec.resize_gray(pixels)))
            except NotEligible as exc:
                record.update(image_columns(format="dicom", **exc.header), status="skipped", error=exc.reason)
            except NotAnImage as exc:
                status, reason = skip_or_error(str(item), exc.reason)
                record.update(status=status, error=reason)
            except (UnreadableImage, ValueError) as exc:
                record.update(status="error", error=getattr(exc, "reason", None) or str(exc))
            if len(batch) >= batch_size:
                flush()
        flush()
        return records


def _array_to_gray(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = rgb_to_gray(a[..., :3].astype(np.float32) / (np.iinfo(a.dtype).max if a.dtype.kind in "ui" else 1.0))
    elif a.ndim != 2:
        raise ValueError(f"array must be 2-D gray or (H, W, 3) RGB, got shape {a.shape}")
    elif a.dtype.kind in "ui":
        a = a.astype(np.float32) / np.iinfo(a.dtype).max
    elif a.dtype.kind == "b":
        a = a.astype(np.float32)
    a = np.asarray(a, dtype=np.float32)
    if a.size == 0 or not np.isfinite(a).all():
        raise ValueError("array is empty or holds NaN/inf")
    return np.clip(a, 0.0, 1.0)


def load(bundle_dir: str | Path, backend: str = "onnx", device: str = "auto", *,
         threads: int | None = None, eligibility: ChestFilter = DEFAULT_FILTER,
         operating_point: str | None = None, threshold: float | None = None) -> Model:
    """Open (and sha256-verify) a bundle and load the model for ``backend`` on ``device``.

    backend: ``onnx`` (default), ``onnx-int8``, ``torchscript`` or ``torch``; device: ``auto``,
    ``cpu`` or ``cuda``; eligibility: which DICOMs are scored (default: frontal chest radiographs,
    see :class:`cxr_deploy.eligibility.ChestFilter`); operating_point (``sens95`` ...) or threshold:
    the decision threshold instead of the bundle's (resolved as by ``batch``, see
    :mod:`cxr_deploy.run_settings`). Raises :class:`~cxr_deploy.errors.BundleError`,
    :class:`~cxr_deploy.serving.backends.BackendUnavailable` or
    :class:`~cxr_deploy.run_settings.RunSettingsError` with a one-line reason.
    """
    from .serving.backends import open_backend
    from .run_settings import RunSettings, merge, resolve_decision

    settings = merge(("load()", RunSettings(threshold=threshold, operating_point=operating_point, backend=backend,
                                            device=device)))
    bundle = ModelBundle.load(bundle_dir)
    decision = resolve_decision(bundle.manifest, settings)
    return Model(bundle, open_backend(bundle, settings.backend, settings.device, threads=threads),
                 eligibility=eligibility, decision=decision)


def run_batch(inputs: Sequence[str | Path] | str | Path, model: str | Path | Model, out: str | Path, **options):
    """The streaming ``cxr-deploy batch`` from Python; returns a summary with ``exit_code``,
    ``counts``, ``images_per_second``.

    ``options`` are :class:`cxr_deploy.batch.settings.BatchConfig` fields: ``backend``, ``device``,
    ``batch_size``, ``workers``, ``cam_dir``, ``cam_for``, ``cam_format``, ``threshold`` or ``operating_point``
    (default: a :class:`Model`'s, else the bundle's), ``shard`` (``"2/4"`` or
    ``(1, 4)`` 0-based), ``resume``, ``overwrite``, ``max_pixels``, ``decode_timeout`` (seconds per file),
    ``progress`` (default off here), ``eligibility`` (a :class:`~cxr_deploy.eligibility.ChestFilter`),
    ``create_dirs``, ``dicom_out`` (a folder: DICOM SR + overlay SC per scored DICOM, see
    :mod:`cxr_deploy.pacs`), ``uid_root``; and ``engine="ray"`` (with ``ray_address``, default: the Ray
    this process already joined, else a local one for the call) to run on a Ray cluster, same rows.
    """
    from .batch.inputs import parse_shard
    from .batch.runner import run_batch as _run
    from .batch.settings import BatchConfig
    from .run_settings import RunSettings, RunSettingsError, merge

    engine, address = options.pop("engine", None), options.pop("ray_address", None)
    try:  # the one resolver (and its checks) for what the arguments leave out
        settings = merge(("run_batch()", RunSettings(engine=engine, backend=options.get("backend"),
                                                     device=options.get("device"))))
    except RunSettingsError as exc:
        raise ValueError(str(exc)) from None
    engine = settings.engine
    options.update(backend=settings.backend, device=settings.device)
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if isinstance(options.get("shard"), str):
        options["shard"] = parse_shard(options["shard"])
    options.setdefault("progress", False)
    if isinstance(model, Model):
        if engine == "ray":
            raise ValueError("engine='ray' loads the bundle in its actors: give the bundle directory as model")
        options.setdefault("eligibility", model.eligibility)
        if options.get("threshold") is None and not options.get("operating_point"):  # the model's own decision
            from .run_settings import CUSTOM_POINT, DEFAULT_POINT

            point = model.decision.operating_point
            if point == CUSTOM_POINT:
                options["threshold"] = model.decision.threshold
            elif point != DEFAULT_POINT:
                options["operating_point"] = point
        config = BatchConfig(inputs=[str(i) for i in inputs], model=model.bundle.directory, out=out, **options)
        return _run(config, bundle=model.bundle, backend=model.backend)
    config = BatchConfig(inputs=[str(i) for i in inputs], model=model, out=out, **options)
    if engine == "ray":
        from .batch.ray_engine import run_batch_ray

        return run_batch_ray(config, address=address)
    return _run(config)
