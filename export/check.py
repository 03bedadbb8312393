"""``cxr-deploy export --check``: re-validate a bundle's exported files against its weights,
changing nothing (the same gate as :func:`cxr_deploy.export.exporter.export_bundle`)."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Callable

import numpy as np

from cxr_deploy import in_population
from cxr_deploy.bundle import ModelBundle

from . import metadata as md
from .exporter import (DEFAULT_INT8_EVAL_LIMIT, METADATA_READERS, MODEL_ARTIFACTS, ONNX_FP32, ONNX_INT8,
                       PARITY_REPORT, REPORT_FORMAT, RUNNERS, ExportError, _kind, _say, _versions, _wrapper)
from .inputs import load_labelled
from .parity import Tolerances, eager_runner, gate_artifact, make_parity_inputs, onnx_runner, run_batches


def check_bundle(bundle_dir: str | Path, *, parity_inputs=(), tolerances: Tolerances | dict | None = None,
                 int8_eval: str | Path | None = None, int8_eval_limit: int | None = DEFAULT_INT8_EVAL_LIMIT,
                 seed: int = 0, progress: Callable[[str], None] | None = None) -> dict:
    """Re-validate an exported bundle without changing it; returns a report (``report["passed"]``).

    Checks: every artifact's sha256 (a tampered file raises :class:`~cxr_deploy.errors.BundleError`),
    that each model file's embedded metadata belongs to this bundle, and the parity gate again
    (images: ``parity_inputs``, else those recorded in ``parity.json`` that still exist). INT8 is
    re-gated statistically when ``int8_eval`` is given; otherwise it is only run for finite output.
    """
    tolerances = Tolerances.from_any(tolerances)
    bundle = ModelBundle.load(bundle_dir)
    models = [n for n in MODEL_ARTIFACTS if bundle.has(n)]
    if not models:
        raise ExportError(f"{bundle.directory} holds no exported model (run `cxr-deploy export` first)")
    wrapper = _wrapper(bundle)
    pos, threshold = bundle.manifest.positive_index, bundle.threshold
    sources = list(parity_inputs or ())
    if not sources and bundle.has(PARITY_REPORT):
        recorded = json.loads(bundle.verified_path(PARITY_REPORT).read_text())
        sources = [p for p in recorded.get("inputs", {}).get("images", {}).get("paths", []) if Path(p).exists()]
    inputs = make_parity_inputs(bundle.spec, sources, seed=seed)
    report = {
        "format": REPORT_FORMAT, "format_version": 1, "mode": "check",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_id": bundle.model_id, "versions": _versions(), "tolerances": tolerances.to_dict(),
        "inputs": inputs.describe(), "artifacts": {},
    }
    _say(progress, f"eager reference on {len(inputs.random)} random tensors and {len(inputs.images)} real images")
    batches = inputs.batches()
    reference = run_batches(eager_runner(wrapper), batches)
    expected = md.artifact_metadata(bundle)
    for name in models:
        path = bundle.verified_path(name)
        _say(progress, f"checking {name}")
        try:
            embedded = METADATA_READERS[_kind(name).format](path)
            mismatches = md.identity_mismatches(embedded, expected)
        except Exception as exc:
            mismatches = [f"cannot read embedded metadata: {exc}"]
        if name == ONNX_INT8:
            result = _check_int8(bundle, path, inputs, int8_eval, int8_eval_limit, tolerances, pos, threshold)
        else:
            runner = RUNNERS[_kind(name).format](path)
            result = gate_artifact(runner, reference, inputs, precision=_kind(name).precision.value, tolerances=tolerances,
                                   positive_index=pos, threshold=threshold,
                                   population_threshold=in_population.threshold_of(bundle))
        if mismatches:
            result["failures"] = [*result.get("failures", []), *(f"metadata {m}" for m in mismatches)]
            result["passed"] = False
        result["metadata_matches_bundle"] = not mismatches
        report["artifacts"][name] = result
    report["passed"] = all(r["passed"] for r in report["artifacts"].values())
    report["failed_artifacts"] = [n for n, r in report["artifacts"].items() if not r["passed"]]
    return report


def _check_int8(bundle, path, inputs, int8_eval, int8_eval_limit, tolerances, pos, threshold) -> dict:
    from .quantize import int8_gate

    if int8_eval is not None and bundle.has(ONNX_FP32):
        evaluation = load_labelled(int8_eval, bundle.spec, bundle.class_names, bundle.manifest.positive_class,
                                   limit=int8_eval_limit)
        result = int8_gate(onnx_runner(bundle.verified_path(ONNX_FP32)), onnx_runner(path), evaluation,
                           positive_index=pos, threshold=threshold, tolerances=tolerances,
                           population_threshold=in_population.threshold_of(bundle))
        result.pop("images", None)
        result["labelled_available"] = evaluation.available
        result["left_out"] = evaluation.left_out(int8_eval_limit, "--int8-eval-limit")
        return result
    runner = onnx_runner(path)
    failures = []
    for name, x in inputs.batches():
        try:
            p, c = runner(x)[:2]
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            continue
        if p.shape != (len(x), len(bundle.class_names)) or not (np.isfinite(p).all() and np.isfinite(c).all()):
            failures.append(f"{name}: wrong shape or non-finite outputs")
    return {"precision": "int8", "gate": "runs (statistical gate needs --int8-eval)", "failures": failures,
            "passed": not failures}
