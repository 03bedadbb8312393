"""``cxr-deploy calibrate``: fit the temperature and the operating points on a new site's labelled
images, and write them into a new bundle that records where it comes from.

The site's images are scored by the parent bundle the way ``batch`` scores them (the Python API);
the fit is :mod:`cxr_deploy.site_calibration`. It lives with export because it exports again (and
reads the weights): a torch command, like ``export``. The new bundle holds the parent's weights at the site
temperature, its ``site`` record (parent bundle id and manifest sha256, the site data's sha256,
the date, each point with its local figures), the parent's artifacts exported again (the
temperature is inside every graph; INT8 calibrated and gated on the site's images) and a
population reference made of the site's images (:mod:`cxr_deploy.population`). It verifies like any
bundle; ``batch``/``listen --operating-point site:sens95`` (or its new default) use it.

Exit codes: 0 written (warnings do not change it), 2 unusable input (bundle, labels, output folder,
no scorable image).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import click

from cxr_deploy import in_population, population
from cxr_deploy import site_calibration as sc
from cxr_deploy.errors import fail as _fail

_POINT_OF_RULE = {"youden_j": "youden", "target_sensitivity=0.9": "sens90", "target_sensitivity=0.95": "sens95",
                  "target_sensitivity=0.98": "sens98"}


def score_site(bundle_dir: Path, rows, backend: str | None, batch_size: int):
    """(labels 0/1, probabilities, [(sha256, label)], scored paths, [why not scored]) of the labelled rows."""
    from cxr_deploy import load
    from cxr_deploy.bundle import sha256_file

    model = load(bundle_dir, backend=backend)
    records = model.predict([r.path for r in rows], batch_size=batch_size)
    labels, scores, items, paths, bad = [], [], [], [], []
    for row, record in zip(rows, records):
        if record["status"] != "ok" or record.get("probability") is None:
            bad.append(f"{row.written}: {record.get('error') or record['status']}")
            continue
        labels.append(int(row.label == model.positive_class))
        scores.append(float(record["probability"]))
        items.append((sha256_file(row.path), row.label))
        paths.append(row.path)
    return labels, scores, items, paths, bad


def default_backend(parent) -> str:
    from cxr_deploy.artifacts import ONNX_FP32

    return "onnx" if parent.has(ONNX_FP32.file) else "torch"


def site_training_record(parent, new_temperature: float) -> dict | None:
    """The parent's training record with its thresholds re-expressed at the site temperature (the
    same decisions as in the parent: ``--operating-point sens95`` still means the validation point)."""
    training = copy.deepcopy(parent.manifest.training)
    if not training:
        return training
    old = parent.manifest.temperature
    for point in (training.get("operating_points") or {}).values():
        point["threshold"] = sc.rescale_threshold(point["threshold"], old, new_temperature)
    if isinstance(training.get("threshold_rule"), dict) and "threshold" in training["threshold_rule"]:
        rule = training["threshold_rule"]
        rule["threshold"] = sc.rescale_threshold(rule["threshold"], old, new_temperature)
    training["rescaled_to_site_temperature"] = {"from": old, "to": new_temperature}
    return training


def choose_default(parent, fit: dict, asked: str | None) -> str | None:
    points = fit["operating_points"]
    if asked:
        name = asked.removeprefix(sc.SITE_PREFIX)
        if name not in points:
            _fail(f"--default-point {asked}: not among the site points ({', '.join(sorted(points)) or 'none'})")
        return name
    rule = str(((parent.manifest.training or {}).get("threshold_rule") or {}).get("rule", "youden_j"))
    name = _POINT_OF_RULE.get(rule, "youden")
    return name if name in points else None


def write_site_bundle(parent, out: Path, fit: dict, record: dict, default: str | None, labels_path: Path,
                      paths: list[str], export: bool):
    from cxr_deploy.bundle import ModelBundle, save_bundle

    temperature = fit["temperature"]["used"]
    training = site_training_record(parent, temperature)
    threshold = (fit["operating_points"][default]["threshold"] if default
                 else sc.rescale_threshold(parent.threshold, parent.manifest.temperature, temperature))
    bundle = save_bundle(out, parent.state_dict(), spec=parent.spec, class_names=parent.class_names,
                         positive_class=parent.manifest.positive_class, threshold=threshold, training=training,
                         temperature=temperature)
    bundle.update(site=record)
    in_population.copy(parent, bundle)  # same weights, same features: the flag carries over, in every graph
    if export:
        reexport(parent, bundle, labels_path, paths)
        bundle = ModelBundle.load(bundle.directory)  # the manifest as the export committed it
    population.write_reference(bundle, fit["scores"], source=f"site calibration set ({fit['images']} images, "
                                                           f"data sha256 {record['data_sha256'][:12]})")
    return bundle


def reexport(parent, bundle, labels_path: Path, paths: list[str]) -> None:
    """The parent's exported artifacts again, at the site temperature (it is inside every graph)."""
    from cxr_deploy import artifacts as a

    kinds = {"torchscript": a.TORCHSCRIPT.file, "onnx": a.ONNX_FP32.file, "fp16": a.ONNX_FP16.file,
             "int8": a.ONNX_INT8.file}
    wanted = {k: parent.has(f) for k, f in kinds.items()}
    if not any(wanted.values()):
        return
    from .exporter import export_bundle

    with tempfile.TemporaryDirectory(prefix="cxr-calibrate-") as tmp:
        for i, path in enumerate(paths):  # the site's images: INT8 calibration and parity inputs
            os.symlink(path, Path(tmp) / f"{i:05d}-{Path(path).name}")
        report = export_bundle(bundle.directory, torchscript=wanted["torchscript"], onnx=wanted["onnx"] or wanted["fp16"]
                               or wanted["int8"], fp16=wanted["fp16"], int8=wanted["int8"],
                               calibration=tmp if wanted["int8"] else None,
                               int8_eval=labels_path if wanted["int8"] else None,
                               progress=lambda m: click.echo(f"export: {m}", err=True))
    if not report.get("passed", False):
        click.echo("WARNING: an artifact failed its export gate and was left out; see parity.json in the bundle",
                   err=True)


def print_fit(fit: dict, parent_here: dict, default: str | None) -> None:
    t = fit["temperature"]
    click.echo(f"site set: {fit['images']} images ({fit['positives']} positive, {fit['negatives']} negative)")
    click.echo(f"temperature: parent {t['parent']:.4g}, fitted {t['fitted']:.4g}, used {t['used']:.4g} "
               f"(NLL {t['nll_parent']:.4f} -> {t['nll_used']:.4f}, ECE {t['ece_parent']:.4f} -> {t['ece_used']:.4f})")
    click.echo(f"{'point':<12} {'threshold':>10}  {'sensitivity (95% CI)':>24}  {'specificity (95% CI)':>24}  pos/neg")
    for name, p in fit["operating_points"].items():
        click.echo(f"{sc.SITE_PREFIX + name:<12} {p['threshold']:>10.4g}  {_fig(p, 'sensitivity'):>24}  "
                   f"{_fig(p, 'specificity'):>24}  {p['positives']}/{p['negatives']}"
                   + ("  (default)" if name == default else ""))
    click.echo("the parent's validation points on this site (how they moved):")
    for name, p in parent_here.items():
        val = (f"validation {p['validation_sensitivity']:.3f}/{p['validation_specificity']:.3f}"
               if p.get("validation_sensitivity") is not None else "")
        click.echo(f"  {name:<10} sensitivity {_fig(p, 'sensitivity')}, specificity {_fig(p, 'specificity')}  {val}")
    for warning in fit["warnings"]:
        click.echo(f"WARNING: {warning}", err=True)


def _fig(point: dict, metric: str) -> str:
    value, ci = point[metric], point[f"{metric}_ci95"]
    return "n/a" if value is None else f"{value:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"


@click.command("calibrate")
@click.argument("bundle", type=click.Path())
@click.option("--labels", "labels_path", required=True, type=click.Path(dir_okay=False),
              help="The site's labelled images: CSV with path (or file) and label columns (REVIEWS.csv of "
                   "`cxr-deploy review` too).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="The calibrated bundle (default: BUNDLE-site next to BUNDLE).")
@click.option("--default-point", default=None, help="Site point that becomes the bundle's default threshold "
              "(e.g. site:sens95; default: the point of the parent's own rule, usually youden).")
@click.option("--backend", default=None, help="How the site images are scored (default: onnx when exported, else torch).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--no-export", "no_export", is_flag=True, help="Do not export the parent's artifacts again (the new "
              "bundle then holds the weights only: `cxr-deploy export` it before serving with ONNX).")
@click.option("--overwrite", is_flag=True, help="Replace a bundle already at --out.")
@click.option("--reference-only", is_flag=True, help="Only write BUNDLE's population reference (in place) from these "
              "images, e.g. its validation split, for a bundle trained before references existed.")
def calibrate_command(bundle, labels_path, out, default_point, backend, batch_size, no_export, overwrite, reference_only):
    """Fit temperature and operating points (youden, sens90/95/98, spec90/95/98) on a site's labelled
    images; write them into a new bundle (see docs/site-trust.md)."""
    from cxr_deploy.bundle import ModelBundle, sha256_file
    from cxr_deploy.errors import CxrDeployError
    from cxr_deploy.labels import read_labels_csv

    try:
        parent = ModelBundle.load(bundle)
        rows = read_labels_csv(labels_path, parent.class_names, parent.manifest.positive_class)
    except CxrDeployError as exc:
        _fail(str(exc))
    target = Path(out) if out else Path(bundle).resolve().with_name(Path(bundle).resolve().name + "-site")
    if not reference_only and target.exists() and any(target.iterdir()) and not overwrite:
        _fail(f"{target} exists: give --overwrite to replace it, or another --out")
    labels, scores, items, paths, bad = score_site(Path(bundle), rows, backend or default_backend(parent), batch_size)
    if bad:
        click.echo(f"WARNING: {len(bad)} of {len(rows)} labelled images not scored, e.g. {bad[0]}", err=True)
    if reference_only:
        try:
            population.write_reference(parent, scores, source=f"images of {Path(labels_path).name} ({len(scores)})")
        except ValueError as exc:
            _fail(str(exc))
        click.echo(f"population reference: {len(scores)} images written into {parent.directory}")
        return
    if len(scores) < population.MIN_REFERENCE:
        _fail(f"{len(scores)} scorable labelled images; calibration needs at least {population.MIN_REFERENCE}")
    fit = sc.fit_site(labels, scores, parent.manifest.temperature)
    default = choose_default(parent, fit, default_point)
    record = {"parent_bundle": parent.model_id, "parent_directory": str(Path(bundle).resolve()),
              "parent_manifest_sha256": sha256_file(Path(bundle) / "manifest.json"),
              "data_sha256": sc.data_hash(items), "labels_file": str(Path(labels_path).resolve()),
              "date": sc.now(), "images": fit["images"], "positives": fit["positives"], "negatives": fit["negatives"],
              "not_scored": len(bad), "temperature": fit["temperature"], "operating_points": fit["operating_points"],
              "default_point": f"{sc.SITE_PREFIX}{default}" if default else None, "warnings": fit["warnings"],
              "parent_points_here": sc.parent_points_here(parent.manifest, labels, scores)}
    print_fit(fit, record["parent_points_here"], default)
    try:
        new = write_site_bundle(parent, target, fit, record, default, Path(labels_path).resolve(),
                                paths, not no_export)
    except CxrDeployError as exc:
        _fail(str(exc))
    click.echo(f"calibrated bundle: {new.directory} (model id {new.model_id}, from {parent.model_id}); "
               f"default threshold {new.threshold:.4g}" + (f" = site:{default}" if default else ""))

