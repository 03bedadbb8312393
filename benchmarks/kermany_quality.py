"""Real-data quality benchmark: train on Kermany, test on held-out patients, fp32 / fp16 / INT8.

    python benchmarks/kermany_quality.py --data ../shared/data/kermany224 --work runs/kermany-quality \
        [--input-size 224] [--epochs 30] [--batch-size 64] [--compare-int8]

Steps (each skipped when its output already exists, so a rerun continues where it stopped):

1. ``labels.csv``: every image of the Kermany train split, with ``split`` = ``test`` for about
   ``--test-fraction`` of the *patients* (whole patients, classes in proportion: the same
   StratifiedGroupKFold carving the trainer uses for validation) and ``train`` for the rest. The
   ``patient`` column goes along, so ``train`` carves its validation split by patient too.
2. ``cxr-deploy train`` from random initialization (ImageNet weights cannot be downloaded on this
   project's machines): stage 2 only, AdamW, cosine schedule.
3. ``cxr-deploy export --fp16 --int8``: INT8 calibrated on training images, gated on validation.
4. Every exported ONNX model (fp32, fp16, INT8) on the held-out patients: AUC, ECE, and sensitivity
   / specificity at each operating point chosen on validation (``sens90``, ``sens95``, ``sens98``,
   ``youden``) and at the bundle's default threshold; CPU images/s of fp32 vs INT8.
5. ``--compare-int8``: INT8 calibration methods x calibration-set sizes, gated on validation.
6. ``--site-trust``: what a site will see (``benchmarks/site_trust.py``): the stored operating points
   on shifted copies of the held-out patients and on adult films, site calibration
   (``cxr-deploy calibrate``) on a shifted set, and the population-shift alarm's false-alarm rate
   and power. The held-out figures above are the *best case*: patients from the same hospitals and
   period as training; see docs/site-trust.md.

Everything is printed and written to ``WORK/quality.json``. The held-out patients never reach
training, validation, calibration or threshold selection.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from cxr_deploy import artifacts

CLI = [sys.executable, "-m", "cxr_deploy.cli"]
# The artifact registry's names (cxr_deploy.artifacts), by precision.
ARTIFACTS = {"fp32": artifacts.ONNX_FP32.file, "fp16": artifacts.ONNX_FP16.file, "int8": artifacts.ONNX_INT8.file}


def log(*parts) -> None:
    print(*parts, flush=True)


def is_positive_label(value: str) -> int:
    """1 for the positive class, 0 for the other: the runtime's one label parser, the bundle's names."""
    from cxr_deploy.bundle import CLASS_NAMES, POSITIVE_CLASS
    from cxr_deploy.labels import parse_label

    name = parse_label(value, CLASS_NAMES, POSITIVE_CLASS)
    if name is None:
        sys.exit(f"unknown label {value!r} (expected one of {', '.join(CLASS_NAMES)})")
    return int(name == POSITIVE_CLASS)


def write_labels(data: Path, work: Path, test_fraction: float, limit: int | None, seed: int) -> Path:
    """``labels.csv`` with a patient-level held-out test split (whole patients, stratified)."""
    from cxr_deploy.training.groups import carve_by_group

    target = work / "labels.csv"
    if target.exists():
        return target
    with open(data / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if limit:  # rehearsal: the first patients (by name) until about `limit` images
        patients = sorted({r["patient"] for r in rows})
        keep, count = set(), 0
        per_patient = {p: 0 for p in patients}
        for r in rows:
            per_patient[r["patient"]] += 1
        for p in np.random.default_rng(seed).permutation(patients):
            keep.add(p)
            count += per_patient[p]
            if count >= limit:
                break
        rows = [r for r in rows if r["patient"] in keep]
    pool = [SimpleNamespace(path=r["path"], label=is_positive_label(r["label"]), group=r["patient"]) for r in rows]
    test = carve_by_group(pool, test_fraction, seed)
    with open(target, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split", "patient"])
        for i, r in enumerate(rows):
            writer.writerow([str((data / r["path"]).resolve()), r["label"], "test" if i in test else "train",
                             r["patient"]])
    n_test = len(test)
    log(f"labels: {len(rows)} images, {len({r['patient'] for r in rows})} patients; held-out test "
        f"{n_test} images from {len({rows[i]['patient'] for i in test})} patients")
    return target


def run(cmd: list[str], log_path: Path, timeout: float) -> int:
    log("$", " ".join(map(str, cmd)))
    start = time.time()
    with open(log_path, "a") as fh:
        proc = subprocess.run(list(map(str, cmd)), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    log(f"  exit {proc.returncode} after {time.time() - start:.0f} s (log: {log_path})")
    return proc.returncode


def train(args, labels: Path, work: Path) -> Path:
    run_dir = work / "run"
    from cxr_deploy.bundle import is_bundle

    if is_bundle(run_dir / "best"):
        return run_dir / "best"
    cmd = [*CLI, "train", "--data", labels, "--out", run_dir, "--weights", "none", "--input-size", args.input_size,
           "--epochs-stage1", 0, "--epochs-stage2", args.epochs, "--lr", args.lr, "--stage2-lr-factor", 1,
           "--batch-size", args.batch_size, "--patience", args.patience, "--device", args.device,
           "--seed", args.seed]
    if args.num_workers is not None:
        cmd += ["--num-workers", args.num_workers]
    if args.cache_dir:
        cmd += ["--cache-dir", args.cache_dir]
    if run(cmd, work / "train.log", args.train_timeout) != 0:
        sys.exit(f"training failed, see {work / 'train.log'}")
    return run_dir / "best"


def split_files(run_dir: Path, work: Path, calibration_images: int) -> tuple[Path, Path]:
    """A folder of links to training images (INT8 calibration) and a CSV of the validation split
    (INT8 gate), both from the run's own ``splits.csv``."""
    from cxr_deploy.export.inputs import evenly_spaced

    from cxr_deploy.training.data import SPLITS_NAME

    with open(run_dir / SPLITS_NAME, newline="") as fh:
        rows = list(csv.DictReader(fh))
    calib = work / f"calibration-{calibration_images}"
    if not calib.exists():
        calib.mkdir()
        train = evenly_spaced([r["path"] for r in rows if r["split"] == "train"], calibration_images)
        for i, path in enumerate(train):
            os.symlink(path, calib / f"{i:05d}-{Path(path).name}")
    val = work / "validation.csv"
    with open(val, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label"])
        writer.writerows([r["path"], r["label"]] for r in rows if r["split"] == "val")
    return calib, val


def export(args, bundle: Path, work: Path) -> dict:
    calib, val = split_files(bundle.parent, work, args.calibration_images)
    report = bundle / artifacts.INT8_REPORT
    if not (bundle / ARTIFACTS["fp32"]).exists() or (args.int8 and not report.exists()):
        cmd = [*CLI, "export", bundle, "--fp16", "--calibration", calib, "--calibration-limit",
               args.calibration_images, "--int8-eval", val, "--int8-eval-limit", 100000]
        if args.int8:
            cmd += ["--int8"] + (["--int8-method", args.int8_method] if args.int8_method else [])
        run(cmd, work / "export.log", args.export_timeout)  # exit 1 = a gate refused a file: reported below
    gate = json.loads(report.read_text()) if report.exists() else {}
    keys = ("passed", "failures", "n", "label_agreement", "auc_fp32", "auc_int8", "delta_auc", "max_abs_diff_prob",
            "max_prob_sum_error", "cam_correlation", "settings")
    return {k: gate.get(k) for k in keys}


def metrics_on(scores: np.ndarray, labels: np.ndarray, manifest) -> dict:
    from cxr_deploy.calibration import expected_calibration_error
    from cxr_deploy.training.threshold import classification_metrics

    points = dict((manifest.training or {}).get("operating_points") or {})
    points["default"] = {"threshold": manifest.threshold}
    out = {"auc": classification_metrics(labels, scores)["auc"], "ece": expected_calibration_error(labels, scores),
           "operating_points": {}}
    for name, point in points.items():
        m = classification_metrics(labels, scores, point["threshold"])
        out["operating_points"][name] = {
            "threshold": point["threshold"], "val_sensitivity": point.get("sensitivity"),
            "val_specificity": point.get("specificity"), "sensitivity": m["sensitivity"],
            "specificity": m["specificity"], "accuracy": m["accuracy"]}
    return out


def predict(runner, tensors: np.ndarray, positive: int, batch: int = 32) -> tuple[np.ndarray, float]:
    start, scores = time.perf_counter(), []
    for i in range(0, len(tensors), batch):
        scores.append(runner(tensors[i:i + batch])[0][:, positive])
    return np.concatenate(scores), len(tensors) / (time.perf_counter() - start)


def evaluate(bundle_dir: Path, labels_csv: Path, work: Path) -> dict:
    """Every ONNX model of the bundle on the held-out patients."""
    from cxr_deploy.bundle import ModelBundle
    from cxr_deploy.export.inputs import load_images
    from cxr_deploy.export.parity import onnx_runner

    bundle = ModelBundle.load(bundle_dir)
    with open(labels_csv, newline="") as fh:
        test = [(r["path"], is_positive_label(r["label"])) for r in csv.DictReader(fh) if r["split"] == "test"]
    images = load_images([p for p, _ in test], bundle.spec, labels=[y for _, y in test])
    labels = np.asarray(images.labels)
    log(f"held-out: {len(images)} images ({int(labels.sum())} {bundle.manifest.positive_class}), "
        f"{len(images.unreadable)} unreadable")
    results = {"n": len(images), "n_positive": int(labels.sum()), "artifacts": {}}
    for precision, name in ARTIFACTS.items():
        if not bundle.has(name):
            results["artifacts"][precision] = {"missing": "not exported or refused by its gate"}
            continue
        scores, rate = predict(onnx_runner(bundle.verified_path(name)), images.tensors,
                               bundle.manifest.positive_index)
        results["artifacts"][precision] = {**metrics_on(scores, labels, bundle.manifest),
                                           "cpu_images_per_s_all_threads": rate}
    results["cpu_speed"] = cpu_speed(bundle, images.tensors)
    return results


def cpu_speed(bundle, tensors: np.ndarray, batch: int = 8, repeats: int = 3) -> dict:
    """fp32 vs INT8 ONNX images/s on this CPU, one thread and all threads, batch 8."""
    from cxr_deploy.export.parity import onnx_runner

    x = tensors[:batch * 4]
    out = {}
    for precision in ("fp32", "int8"):
        if not bundle.has(ARTIFACTS[precision]):
            continue
        for threads in (1, os.cpu_count()):
            runner = onnx_runner(bundle.verified_path(ARTIFACTS[precision]), threads=threads)
            predict(runner, x[:batch], bundle.manifest.positive_index, batch)  # warm-up
            best = max(predict(runner, x, bundle.manifest.positive_index, batch)[1] for _ in range(repeats))
            out[f"{precision}_threads{threads}"] = best
    for threads in (1, os.cpu_count()):
        if f"int8_threads{threads}" in out:
            out[f"int8_speedup_threads{threads}"] = out[f"int8_threads{threads}"] / out[f"fp32_threads{threads}"]
    return out


def compare_int8(args, bundle_dir: Path, work: Path) -> list[dict]:
    """INT8 calibration methods x calibration-set sizes, each gated on the validation split."""
    from cxr_deploy.bundle import ModelBundle
    from cxr_deploy.export import metadata as md
    from cxr_deploy.export.inputs import collect_images, load_labelled
    from cxr_deploy.export.parity import Tolerances, onnx_runner
    from cxr_deploy.export.quantize import int8_gate, quantize_int8

    bundle = ModelBundle.load(bundle_dir)
    fp32 = bundle.verified_path(ARTIFACTS["fp32"])
    _, val = split_files(bundle_dir.parent, work, args.calibration_images)
    evaluation = load_labelled(val, bundle.spec, bundle.class_names, bundle.manifest.positive_class)
    folder = work / "int8-comparison"
    folder.mkdir(exist_ok=True)
    rows = []
    for size in args.compare_sizes:
        calib, _ = split_files(bundle_dir.parent, work, size)
        calibration = collect_images([calib], bundle.spec)
        for variant in args.compare_methods:
            method, _, option = variant.partition(":")  # "MinMax:full-range" = reduce_range off
            dst = folder / f"{method}-{option or 'default'}-{size}.onnx"
            start = time.perf_counter()
            quantize_int8(fp32, dst, calibration, md.artifact_metadata(bundle, precision="int8"),
                          {"calibrate_method": method, **({"reduce_range": False} if option == "full-range" else {})})
            seconds = time.perf_counter() - start
            gate = int8_gate(onnx_runner(fp32), onnx_runner(dst), evaluation,
                             positive_index=bundle.manifest.positive_index, threshold=bundle.threshold,
                             tolerances=Tolerances())
            speed = cpu_rate(dst, evaluation.tensors, bundle.manifest.positive_index)
            rows.append({"method": variant, "calibration_images": size, "quantize_s": seconds,
                         "passed": gate["passed"], "label_agreement": gate["label_agreement"],
                         "delta_auc": gate["delta_auc"], "max_abs_diff_prob": gate["max_abs_diff_prob"],
                         "max_prob_sum_error": gate["max_prob_sum_error"],
                         "cam_correlation": gate["cam_correlation"], "cpu_images_per_s_1_thread": speed})
            log(format_comparison_row(rows[-1]))
            dst.unlink()
    return rows


def cpu_rate(path: Path, tensors: np.ndarray, positive: int, batch: int = 8) -> float:
    from cxr_deploy.export.parity import onnx_runner

    runner = onnx_runner(path, threads=1)
    predict(runner, tensors[:batch], positive, batch)
    return predict(runner, tensors[:batch * 4], positive, batch)[1]


def format_comparison_row(r: dict) -> str:
    corr = r["cam_correlation"] or {}
    return (f"  int8 {r['method']:<17} calib {r['calibration_images']:>4}: agreement {r['label_agreement']:.2%}  "
            f"dAUC {r['delta_auc']:+.4f}  max|dp| {r['max_abs_diff_prob']:.3f}  CAM r median "
            f"{corr.get('median', float('nan')):.3f} p10 {corr.get('p10', float('nan')):.3f}  "
            f"{'PASS' if r['passed'] else 'fail'}  ({r['quantize_s']:.0f} s, {r['cpu_images_per_s_1_thread']:.1f} img/s)")


def print_results(results: dict) -> None:
    test = results["held_out"]
    log(f"\nheld-out patients: {test['n']} images, {test['n_positive']} positive")
    log(f"{'model':<6} {'AUC':>6} {'ECE':>6}  " + "  ".join(f"{p:>22}" for p in
                                                          ("sens90", "sens95", "sens98", "youden", "default")))
    log(f"{'':<6} {'':>6} {'':>6}  " + "  ".join(f"{'thr  sens / spec':>22}" for _ in range(5)))
    for precision, m in test["artifacts"].items():
        if "missing" in m:
            log(f"{precision:<6} {m['missing']}")
            continue
        cells = []
        for name in ("sens90", "sens95", "sens98", "youden", "default"):
            p = m["operating_points"].get(name)
            cells.append(f"{p['threshold']:.3f} {p['sensitivity']:.3f}/{p['specificity']:.3f}" if p else "-")
        log(f"{precision:<6} {m['auc']:6.4f} {m['ece']:6.4f}  " + "  ".join(f"{c:>22}" for c in cells))
    speed = test.get("cpu_speed", {})
    if speed:
        log("CPU ONNX images/s (batch 8): " + ", ".join(f"{k} {v:.2f}" for k, v in speed.items()))
    gate = results.get("int8_gate") or {}
    if gate:
        log(f"INT8 export gate (validation): passed={gate['passed']} agreement={gate['label_agreement']} "
            f"dAUC={gate['delta_auc']} CAM r={gate['cam_correlation']} failures={gate['failures']}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/kermany224"))
    parser.add_argument("--work", type=Path, default=Path("runs/kermany-quality"))
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--limit", type=int, default=None, help="Rehearsal: about this many images in all.")
    parser.add_argument("--calibration-images", type=int, default=100)
    parser.add_argument("--no-int8", dest="int8", action="store_false")
    parser.add_argument("--int8-method", default=None)
    parser.add_argument("--compare-int8", action="store_true")
    parser.add_argument("--compare-methods", type=lambda s: s.split(","), default=["MinMax", "Entropy", "Percentile", "MinMax:full-range"])
    parser.add_argument("--compare-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[32, 100, 300])
    parser.add_argument("--site-trust", action="store_true", help="Also run benchmarks/site_trust.py on this work dir.")
    parser.add_argument("--adult", type=Path, default=Path("../shared/data/adult_cxr"))
    parser.add_argument("--train-timeout", type=float, default=3 * 3600)
    parser.add_argument("--export-timeout", type=float, default=3600)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    labels = write_labels(args.data.resolve(), args.work, args.test_fraction, args.limit, args.seed)
    bundle = train(args, labels, args.work)
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "int8_gate": export(args, bundle, args.work) if args.int8 else None}
    results["held_out"] = evaluate(bundle, labels, args.work)
    if args.compare_int8:
        results["int8_comparison"] = compare_int8(args, bundle, args.work)
    (args.work / "quality.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    print_results(results)
    log(f"\nwritten: {args.work / 'quality.json'}")
    if args.site_trust:  # the held-out figures above are the best case: what moves on a shifted set
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import site_trust

        site_trust.main(["--work", str(args.work), "--adult", str(args.adult)])


if __name__ == "__main__":
    main()
