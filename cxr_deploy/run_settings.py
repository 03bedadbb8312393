"""The settings of a run, resolved in one place by one rule: **an explicit flag (or API argument) >
the config file > the bundle > the built-in default**.

What is resolved here: the decision threshold and the operating point it comes from, the backend,
the device, the engine, and which images are scored (the eligibility flags). Every way of running
the model resolves them through :func:`merge` and :func:`resolve_decision`: ``cxr-deploy batch``
(flags), :func:`cxr_deploy.load` / :func:`cxr_deploy.run_batch` (arguments), ``cxr-deploy pacs
listen`` (flags, then the ``[run]`` table of its TOML config) and the Ray engine (through
:class:`~cxr_deploy.batch.settings.BatchConfig`): a site that picks ``sens95`` gets ``sens95``
from each of them, never the bundle's default from one.

The threshold: within one layer, a number (``threshold``) and a named point (``operating_point``,
recorded at training: ``sens90``, ``sens95``, ``sens98``, ``youden``) exclude each other; the first
layer that gives either decides. The result records where it came from (:class:`Decision`): the
point's name, ``custom`` for a number given, ``default`` for the bundle's own threshold; every row
(CSV column ``operating_point``), report and DICOM SR says which.

Torch-free (imported by the CLI and the listener before any model loads).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .decision import check_threshold, operating_point
from .eligibility import ChestFilter
from .errors import CxrDeployError

DEFAULT_POINT = "default"  # the bundle's own threshold
CUSTOM_POINT = "custom"  # a number given as the threshold


class RunSettingsError(CxrDeployError):
    """Run settings that contradict each other or that the bundle cannot honour (one line)."""


@dataclass(frozen=True)
class Decision:
    """The threshold a run decides with, and its origin (a point's name, ``custom`` or ``default``)."""

    threshold: float
    operating_point: str


@dataclass(frozen=True)
class RunSettings:
    """One layer's settings (``None``: not given here) or, after :func:`merge`, a run's."""

    threshold: float | None = None
    operating_point: str | None = None
    backend: str | None = None
    device: str | None = None
    engine: str | None = None
    modalities: tuple[str, ...] | None = None  # added to the scored modalities (--modality)
    body_parts: tuple[str, ...] | None = None  # added to the scored body parts (--body-part)
    accept_any_view: bool | None = None
    dicom_filter: bool | None = None  # False: --no-dicom-filter

    @property
    def eligibility(self) -> ChestFilter:
        return ChestFilter.build(",".join(self.modalities or ()), ",".join(self.body_parts or ()),
                                 bool(self.accept_any_view), self.dicom_filter is not False)


DEFAULTS = RunSettings(backend="onnx", device="auto", engine="local", modalities=(), body_parts=(),
                       accept_any_view=False, dicom_filter=True)
_DECISION = ("threshold", "operating_point")


def merge(*layers: tuple[str, RunSettings | None]) -> RunSettings:
    """One run's settings from ``(where, settings)`` layers, highest precedence first (where: what
    the user calls that layer in a message, e.g. ``"--threshold/--operating-point"``). Each field
    comes from the first layer that gives it, else :data:`DEFAULTS`; the threshold and the
    operating point come together from the first layer giving either (the bundle decides when
    none does: :func:`resolve_decision`)."""
    values = {}
    for where, layer in layers:
        if layer is None:
            continue
        if layer.threshold is not None and layer.operating_point:
            raise RunSettingsError(f"{where}: give either a threshold or an operating point, not both")
        if layer.threshold is not None:
            check(lambda: check_threshold(layer.threshold), where)
        for key, choices in _CHOICES.items():
            value = getattr(layer, key)
            if value is not None and value not in choices():
                raise RunSettingsError(f"{where}: {key} must be one of {', '.join(choices())}, got {value!r}")
        for f in fields(RunSettings):
            value = getattr(layer, f.name)
            if f.name in _DECISION:
                if not any(k in values for k in _DECISION) and (layer.threshold is not None or layer.operating_point):
                    values.update(threshold=layer.threshold, operating_point=layer.operating_point or None)
            elif value is not None and f.name not in values:
                values[f.name] = value
    merged = {f.name: getattr(DEFAULTS, f.name) for f in fields(RunSettings)} | values
    return RunSettings(**merged)


def check(call, where: str):
    try:
        return call()
    except ValueError as exc:
        raise RunSettingsError(f"{where}: {exc}") from None


def resolve_decision(manifest, settings: RunSettings | None = None) -> Decision:
    """The threshold of a run with ``settings`` (merged) on the bundle whose manifest is given."""
    settings = settings or RunSettings()
    if settings.threshold is not None and settings.operating_point:
        raise RunSettingsError("give either a threshold or an operating point, not both")
    if settings.operating_point:
        return Decision(check(lambda: operating_point(manifest, settings.operating_point), "operating point"),
                        settings.operating_point)
    if settings.threshold is not None:
        return Decision(check(lambda: check_threshold(settings.threshold), "threshold"), CUSTOM_POINT)
    return Decision(float(manifest.threshold), DEFAULT_POINT)


def from_table(table: dict, where: str) -> RunSettings:
    """A config file's ``[run]`` table as a settings layer; unknown keys and wrong types are errors
    (a misspelt ``operating_piont`` must not silently fall back to the bundle's threshold); values
    are checked when the layer is merged."""
    known = {"threshold", "operating_point", "backend", "device", "modality", "body_part", "accept_any_view",
             "dicom_filter"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise RunSettingsError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")

    def terms(key):
        value = table.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RunSettingsError(f"{where}: {key} must be a string or a list of strings")
        return tuple(value)

    def flag(key):
        value = table.get(key)
        if value is not None and not isinstance(value, bool):
            raise RunSettingsError(f"{where}: {key} must be true or false")
        return value

    threshold = table.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise RunSettingsError(f"{where}: threshold must be a number in [0, 1]")
    point = table.get("operating_point")
    if point is not None and not isinstance(point, str):
        raise RunSettingsError(f"{where}: operating_point must be a name such as \"sens95\"")
    return RunSettings(threshold=threshold, operating_point=point, backend=table.get("backend"),
                       device=table.get("device"), modalities=terms("modality"), body_parts=terms("body_part"),
                       accept_any_view=flag("accept_any_view"), dicom_filter=flag("dicom_filter"))


def _backends() -> tuple[str, ...]:
    from .artifacts import Backend

    return tuple(b.value for b in Backend)


def _devices() -> tuple[str, ...]:
    from .artifacts import Device

    return tuple(d.value for d in Device)


def _engines() -> tuple[str, ...]:
    from .batch.choices import ENGINES

    return ENGINES


_CHOICES = {"backend": _backends, "device": _devices, "engine": _engines}
