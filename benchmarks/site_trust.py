"""What a site will see (issue 20): stored operating points under shift, site calibration, and the
population-shift alarm's false-alarm rate and power, on a model trained by kermany_quality.py.

    python benchmarks/site_trust.py --work runs/kermany-quality [--adult ../shared/data/adult_cxr] \
        [--site-images 100] [--draws 200]

Data (nothing here reaches training, validation or threshold selection of the model):

- ``heldout``: the patients kermany_quality.py held out of the Kermany *train* split (``labels.csv``,
  ``split=test``), as they are;
- shifted copies of those images, written as PNG under ``WORK/shifted/NAME/``: ``contrast`` (contrast
  x0.6 about mid-grey), ``gamma`` (gamma 1.6: darker mid-tones), ``blur`` (down to 1/4 size and back:
  a softer, lower-resolution film), ``exposure`` (contrast x0.7 then +0.12 brightness, clipped);
- ``prevalence``: held-out images resampled to 37.5 % NORMAL (the official test split's mix) with
  no change to any image;
- ``adult``: ``adult_cxr/`` (adult films from other hospitals, almost all pneumonia), if present.

Steps: (1) ``calibrate --reference-only`` writes the model's reference from its validation split
(a model trained before references existed); (2) every set is scored once through the Python API
(torch backend, as ``batch`` scores them); (3) the stored points on each set; (4) site
calibration: ``--site-images`` images of whole patients from a shifted set as the site's labelled
set, the rest of that set as evaluation, the fit of :mod:`cxr_deploy.site_calibration` (what
``calibrate`` runs) over ``--draws`` random draws, and one real ``calibrate`` + ``batch
--operating-point site:sens95`` run for the record; (5) the alarm's rate over random batches of
each size from every set (on ``heldout`` that rate is the false-alarm rate).

Everything is printed and written to ``WORK/site_trust.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "cxr_deploy.cli"]
SHIFTS = {
    "contrast": lambda g: np.clip(0.5 + 0.6 * (g - 0.5), 0, 1),
    "gamma": lambda g: np.clip(g, 0, 1) ** 1.6,
    "blur": None,  # resolution: see shift_image
    "exposure": lambda g: np.clip(0.5 + 0.7 * (g - 0.5) + 0.12, 0, 1),
}
BATCH_SIZES = (30, 50, 100, 200, 400)
POINTS = ("youden", "sens90", "sens95", "sens98", "default")


def log(*parts) -> None:
    print(*parts, flush=True)


def shift_image(src: str, dst: Path, name: str) -> None:
    from PIL import Image

    from cxr_deploy.imaging import read_image

    gray = read_image(src).pixels.astype(np.float64)
    if name == "blur":
        img = Image.fromarray(np.uint8(np.rint(gray * 255)))
        w, h = img.size
        img = img.resize((max(1, w // 4), max(1, h // 4)), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    else:
        img = Image.fromarray(np.uint8(np.rint(SHIFTS[name](gray) * 255)))
    img.save(dst)


def heldout(work: Path) -> list[dict]:
    from cxr_deploy.bundle import POSITIVE_CLASS

    with open(work / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    return [{"path": r["path"], "y": int(r["label"] == POSITIVE_CLASS or r["label"] == "1"), "patient": r["patient"]}
            for r in rows]


def build_sets(work: Path, adult: Path | None, seed: int) -> dict[str, list[dict]]:
    base = heldout(work)
    sets = {"heldout": base}
    for name in SHIFTS:
        folder = work / "shifted" / name
        folder.mkdir(parents=True, exist_ok=True)
        items = []
        for i, r in enumerate(base):
            dst = folder / f"{i:05d}-{Path(r['path']).stem}.png"
            if not dst.exists():
                shift_image(r["path"], dst, name)
            items.append({**r, "path": str(dst)})
        sets[name] = items
    rng = np.random.default_rng(seed)
    normal = [r for r in base if r["y"] == 0]
    pneumonia = [r for r in base if r["y"] == 1]
    keep = rng.choice(len(pneumonia), size=min(len(pneumonia), int(len(normal) * 0.625 / 0.375)), replace=False)
    sets["prevalence"] = normal + [pneumonia[i] for i in sorted(keep)]
    if adult and (adult / "manifest.csv").exists():
        with open(adult / "manifest.csv", newline="") as fh:
            sets["adult"] = [{"path": str(adult / r["path"]), "y": int(r["label"] == "PNEUMONIA"),
                              "patient": r["path"]} for r in csv.DictReader(fh) if r["label"] in ("NORMAL", "PNEUMONIA")]
    return sets


def reference(bundle: Path, work: Path) -> None:
    from cxr_deploy import population
    from cxr_deploy.bundle import ModelBundle

    if population.load_reference(ModelBundle.load(bundle)) is not None:
        return
    val = work / "validation.csv"
    with open(work / "run" / "splits.csv", newline="") as fh, open(val, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "label"])
        writer.writerows([r["path"], r["label"]] for r in csv.DictReader(fh) if r["split"] == "val")
    run([*CLI, "calibrate", bundle, "--labels", val, "--reference-only", "--backend", "torch"])


def run(cmd) -> subprocess.CompletedProcess:
    text = " ".join(map(str, cmd))
    log("$", text if len(text) < 400 else text[:400] + f" ... ({len(cmd)} arguments)")
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    log(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"failed: exit {proc.returncode}")
    return proc


def score(model, items: list[dict], cache: Path) -> np.ndarray:
    """Positive-class probabilities of ``items`` (cached per model and image list in ``cache``)."""
    import hashlib

    key = hashlib.sha256((model.model_id + "\n".join(r["path"] for r in items)).encode()).hexdigest()[:16]
    file = cache / f"{key}.npy"
    if file.exists():
        return np.load(file)
    records = model.predict([r["path"] for r in items], batch_size=32)
    p = np.array([np.nan if r["probability"] is None else r["probability"] for r in records])
    cache.mkdir(exist_ok=True)
    np.save(file, p)
    return p


def stored_points(manifest, y, p) -> dict:
    from cxr_deploy.site_calibration import parent_points_here

    ok = np.isfinite(p)
    from cxr_deploy.training.threshold import classification_metrics

    return {"auc": classification_metrics(y[ok], p[ok])["auc"], "n": int(ok.sum()), "positives": int(y[ok].sum()),
            "points": parent_points_here(manifest, y[ok], p[ok])}


def split_by_patient(items, rng, n_site: int) -> tuple[np.ndarray, np.ndarray]:
    patients = sorted({r["patient"] for r in items})
    order = rng.permutation(patients)
    chosen, count = set(), 0
    for p in order:
        if count >= n_site:
            break
        chosen.add(p)
        count += sum(1 for r in items if r["patient"] == p)
    site = np.array([r["patient"] in chosen for r in items])
    return site, ~site


def calibration_draws(manifest, items, y, p, n_site: int, draws: int, seed: int) -> dict:
    """The site fit on ``n_site`` images of whole patients, evaluated on the rest, ``draws`` times."""
    from cxr_deploy.calibration import sigmoid
    from cxr_deploy.site_calibration import fit_site, margins_from_probabilities

    rng = np.random.default_rng(seed)
    margins = margins_from_probabilities(p, manifest.temperature)
    stored = (manifest.training or {}).get("operating_points") or {}
    out = {name: {"site_sens": [], "site_spec": [], "stored_sens": [], "stored_spec": []}
           for name in ("youden", "sens90", "sens95", "sens98", "spec90", "spec95")}
    alarms = {100: [], 200: []}  # the calibrated bundle's alarm (site reference) on batches of the same set
    for _ in range(draws):
        site, rest = split_by_patient(items, rng, n_site)
        fit = fit_site(y[site], p[site], manifest.temperature)
        scores_rest = sigmoid(margins[rest] / fit["temperature"]["used"])
        site_alarm(fit, scores_rest, rng, alarms)
        for name, acc in out.items():
            if name not in fit["operating_points"]:
                continue
            called = [("site", scores_rest >= fit["operating_points"][name]["threshold"])]
            if name in stored:  # bundles trained before the spec family have no stored spec points
                called.append(("stored", p[rest] >= stored[name]["threshold"]))
            for key, c in called:
                acc[f"{key}_sens"].append(float(c[y[rest] == 1].mean()))
                acc[f"{key}_spec"].append(float((~c[y[rest] == 0]).mean()))
    points = {name: {k: {"median": float(np.median(v)), "p5": float(np.percentile(v, 5)), "p95": float(np.percentile(v, 95))}
                     for k, v in acc.items() if v} for name, acc in out.items()}
    return {**points, "site_reference_false_alarms": {n: float(np.mean(v)) for n, v in alarms.items() if v}}


def site_alarm(fit: dict, scores_rest: np.ndarray, rng, alarms: dict) -> None:
    """One batch of each size from the rest of the same set against the site reference."""
    from cxr_deploy import population

    reference = population.build_reference(fit["scores"], source="site", temperature=1.0)
    threshold = fit["operating_points"]["youden"]["threshold"]
    for n, acc in alarms.items():
        if n <= len(scores_rest):
            batch = scores_rest[rng.choice(len(scores_rest), n, replace=False)]
            acc.append(population.compare(reference, batch, threshold)["status"] == "differs")


def alarm_rates(bundle, p: np.ndarray, threshold: float, draws: int, seed: int) -> dict:
    from cxr_deploy import population

    ref = population.load_reference(bundle)
    rng = np.random.default_rng(seed)
    p = p[np.isfinite(p)]
    rates = {}
    for n in BATCH_SIZES:
        if n > len(p):
            continue
        fired = [population.compare(ref, p[rng.choice(len(p), n, replace=False)], threshold)["status"] == "differs"
                 for _ in range(draws)]
        rates[n] = float(np.mean(fired))
    return rates


def cli_record(bundle: Path, work: Path, items, y, n_site: int, seed: int) -> dict:
    """One real calibrate + batch --operating-point site:sens95 run on one draw of the gamma set."""
    from cxr_deploy.batch.results_file import iter_results
    from cxr_deploy.bundle import ModelBundle

    site, rest = split_by_patient(items, np.random.default_rng(seed), n_site)
    folder = work / "site-cli"
    folder.mkdir(exist_ok=True)
    for name, mask in (("site", site), ("rest", rest)):
        with open(folder / f"{name}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label"])
            writer.writerows([r["path"], "PNEUMONIA" if r["y"] else "NORMAL"] for r, m in zip(items, mask) if m)
    out = folder / "bundle"
    run([*CLI, "calibrate", bundle, "--labels", folder / "site.csv", "--out", out, "--overwrite", "--no-export",
         "--backend", "torch"])
    results = folder / "rest-results.csv"
    paths = [r["path"] for r, m in zip(items, rest) if m]
    (folder / "rest-files.txt").write_text("\n".join(paths) + "\n")
    run([*CLI, "batch", *paths, "--model", out, "--backend", "torch", "--out", results, "--overwrite",
         "--operating-point", "site:sens95", "--labels", folder / "rest.csv", "--workers", "0"])
    report = json.loads((folder / "rest-results_report" / "report.json").read_text())
    m = report["metrics"]
    return {"site_images": int(site.sum()), "evaluation_images": int(rest.sum()),
            "bundle": str(out), "site_record": ModelBundle.load(out).manifest.site["operating_points"]["sens95"],
            "evaluation": {"sensitivity": m["recall_sensitivity"], "specificity": m["specificity"],
                           "ci95": m["ci95"]}, "population": report.get("population")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/kermany-quality"))
    parser.add_argument("--adult", type=Path, default=Path("../shared/data/adult_cxr"))
    parser.add_argument("--site-images", type=int, default=100)
    parser.add_argument("--site-set", default="contrast,gamma",
                        help="The shifted set(s) the site calibration is measured on (comma-separated; the real "
                             "calibrate + batch run uses the first).")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--alarm-draws", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cli", action="store_true", help="Skip the real calibrate + batch run.")
    args = parser.parse_args(argv)
    import cxr_deploy
    from cxr_deploy.bundle import ModelBundle

    bundle_dir = args.work / "run" / "best"
    reference(bundle_dir, args.work)
    bundle = ModelBundle.load(bundle_dir)
    model = cxr_deploy.load(bundle_dir, backend="torch")
    sets = build_sets(args.work, args.adult if args.adult.exists() else None, args.seed)
    results = {"bundle": str(bundle_dir), "model_id": bundle.model_id, "sets": {}, "alarm": {}}
    for name, items in sets.items():
        start = time.perf_counter()
        y, p = np.array([r["y"] for r in items]), score(model, items, args.work / "scores")
        results["sets"][name] = stored_points(bundle.manifest, y, p)
        results["alarm"][name] = alarm_rates(bundle, p, bundle.threshold, args.alarm_draws, args.seed)
        log(f"{name}: {len(items)} images scored in {time.perf_counter() - start:.0f} s; "
            f"AUC {results['sets'][name]['auc']:.4f}; alarm rate by batch size {results['alarm'][name]}")
        if name in args.site_set.split(","):
            c = results.setdefault("calibration", {})[name] = {
                "set": name, "site_images": args.site_images, "draws": args.draws,
                "points": calibration_draws(bundle.manifest, items, y, p, args.site_images, args.draws, args.seed)}
            if not args.no_cli and name == args.site_set.split(",")[0]:
                c["cli_run"] = cli_record(bundle_dir, args.work, items, y, args.site_images, args.seed)
    (args.work / "site_trust.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    print_results(results)
    log(f"\nwritten: {args.work / 'site_trust.json'}")


def print_results(r: dict) -> None:
    log("\nstored operating points (chosen on validation) on each set: sensitivity / specificity")
    log(f"{'set':<11} {'n':>4} {'AUC':>6}  " + "  ".join(f"{p:>13}" for p in POINTS))
    for name, s in r["sets"].items():
        cells = [f"{s['points'][p]['sensitivity'] or 0:.3f}/{s['points'][p]['specificity'] or 0:.3f}"
                 if p in s["points"] else "-" for p in POINTS]
        log(f"{name:<11} {s['n']:>4} {s['auc']:6.4f}  " + "  ".join(f"{c:>13}" for c in cells))
    log("\nalarm rate (fraction of random batches flagged; heldout = false alarms)")
    sizes = sorted({n for a in r["alarm"].values() for n in a}, key=int)
    log(f"{'set':<11} " + " ".join(f"{'n=' + str(n):>7}" for n in sizes))
    for name, a in r["alarm"].items():
        log(f"{name:<11} " + " ".join(f"{a[n]:>7.3f}" if n in a else f"{'-':>7}" for n in sizes))
    for c in (r.get("calibration") or {}).values():
        log(f"\nsite calibration on '{c['set']}' ({c['site_images']} site images of whole patients, the rest as "
            f"evaluation, {c['draws']} draws): median (5th-95th percentile)")
        for name, m in c["points"].items():
            if name == "site_reference_false_alarms":
                log(f"  alarm of the calibrated bundle (site reference) on batches of the same shifted set: {m}")
                continue
            f = lambda k: f"{m[k]['median']:.3f} ({m[k]['p5']:.3f}-{m[k]['p95']:.3f})"  # noqa: E731
            stored = f"stored: sens {f('stored_sens')} spec {f('stored_spec')}" if "stored_sens" in m else "stored: -"
            log(f"  {name:<7} {stored:<62} site:{name}: sens {f('site_sens')} spec {f('site_spec')}")
        if c.get("cli_run"):
            e = c["cli_run"]["evaluation"]
            log(f"  CLI run (one draw): site:sens95 on {c['cli_run']['evaluation_images']} evaluation images: "
                f"sensitivity {e['sensitivity']:.3f}, specificity {e['specificity']:.3f}")


if __name__ == "__main__":
    main()
