"""The per-image out-of-population flag (cxr_deploy.in_population): does the Mahalanobis distance of
the pooled ResNet50 features from the training population separate adult films from held-out
pediatric ones, at a threshold that flags few in-population images?

    python benchmarks/ood_feasibility.py --work runs/kermany-quality --product [--out DIR]

``--product`` measures the product end to end: a copy of WORK/run/best gets its statistics from
``cxr_deploy.training.population_fit.fit_bundle`` (what training runs: every training-split image,
threshold at the validation 95th percentile, training ages 1-5), is exported (TorchScript, ONNX,
INT8, each gated), and ``cxr-deploy batch`` scores the held-out patients, adult_cxr/ and the chest
radiographs among ``dicom/`` through the CLI (ONNX and INT8); the figures are read from the
results CSVs' ``population_score`` and ``in_population``. Written to OUT/ood_product.json.

Without ``--product``, the original feasibility measurement (eager features, layer4 only):

Features: the model's global-average-pooled 2048-vector (what the classifier head sees), eager
PyTorch, images preprocessed as inference does. Fit: class means and one shared covariance
(Ledoit-Wolf shrinkage) on ``--train-images`` images of the run's *train* split; score = the
smaller Mahalanobis distance to a class mean; threshold = the 95th percentile on the validation split.
Reported on the held-out patients (the in-population flag rate), the shifted sets site_trust.py
wrote under WORK/shifted/, and adult_cxr/ (AUROC against held-out). Written to WORK/ood_feasibility.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np


def features(model, spec, paths: list[str], batch: int = 64) -> np.ndarray:
    import torch

    from cxr_deploy.imaging import read_image

    out = []
    for i in range(0, len(paths), batch):
        x = np.stack([spec.apply(read_image(p).pixels) for p in paths[i:i + batch]])
        with torch.no_grad():
            out.append(model(torch.from_numpy(x)).numpy().astype(np.float64))
    return np.concatenate(out)


def main(argv=None) -> None:
    import torch
    from sklearn.covariance import LedoitWolf
    from sklearn.metrics import roc_auc_score

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from site_trust import build_sets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/kermany-quality"))
    parser.add_argument("--adult", type=Path, default=Path("../shared/data/adult_cxr"))
    parser.add_argument("--train-images", type=int, default=1000)
    args = parser.parse_args(argv)
    from cxr_deploy.bundle import ModelBundle
    from cxr_deploy.export.inputs import evenly_spaced

    bundle = ModelBundle.load(args.work / "run" / "best")
    model = bundle.build_model()
    model.fc = torch.nn.Identity()
    with open(args.work / "run" / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    train = evenly_spaced([r for r in rows if r["split"] == "train"], args.train_images)
    val = [r["path"] for r in rows if r["split"] == "val"]
    f_train = features(model, bundle.spec, [r["path"] for r in train])
    labels = np.array([r["label"] == "PNEUMONIA" for r in train])
    means = [f_train[labels == c].mean(0) for c in (False, True)]
    centred = np.concatenate([f_train[labels == c] - means[i] for i, c in enumerate((False, True))])
    precision = LedoitWolf().fit(centred).precision_

    def score(f):
        return np.min([np.einsum("ij,jk,ik->i", f - m, precision, f - m) for m in means], axis=0) ** 0.5

    threshold = float(np.percentile(score(features(model, bundle.spec, val)), 95))
    sets = build_sets(args.work, args.adult if args.adult.exists() else None, 0)
    heldout = score(features(model, bundle.spec, [r["path"] for r in sets["heldout"]]))
    results = {"threshold_val_p95": threshold, "train_images": len(train), "sets": {}}
    for name, items in sets.items():
        s = heldout if name == "heldout" else score(features(model, bundle.spec, [r["path"] for r in items]))
        auroc = None if name == "heldout" else float(roc_auc_score(
            np.r_[np.zeros(len(heldout)), np.ones(len(s))], np.r_[heldout, s]))
        results["sets"][name] = {"n": len(s), "flagged": float((s > threshold).mean()), "auroc_vs_heldout": auroc}
        print(f"{name:<11} n={len(s):>4} flagged {np.mean(s > threshold):.3f}"
              + (f"  AUROC vs heldout {auroc:.3f}" if auroc is not None else ""), flush=True)
    (args.work / "ood_feasibility.json").write_text(json.dumps(results, indent=2) + "\n")


def product(args) -> dict:
    """Fit, export and run the CLI on a copy of the run's best bundle; returns the figures."""
    import shutil
    import subprocess

    from sklearn.metrics import roc_auc_score

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from site_trust import build_sets

    from cxr_deploy.batch.results_file import iter_results
    from cxr_deploy.bundle import ModelBundle
    from cxr_deploy.export import export_bundle
    from cxr_deploy.training.population_fit import fit_bundle

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    bundle_dir = out / "bundle"
    shutil.rmtree(bundle_dir, ignore_errors=True)
    shutil.copytree(args.work / "run" / "best", bundle_dir)
    with open(args.work / "run" / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    record = fit_bundle(ModelBundle.load(bundle_dir), [r["path"] for r in train],
                        [int(r["label"] == "PNEUMONIA") for r in train], [r["path"] for r in val],
                        quantile=args.quantile, age_range="1-5", progress=print)
    print("fitted:", record, flush=True)
    calibration = out / "calibration"
    shutil.rmtree(calibration, ignore_errors=True)
    calibration.mkdir()
    for i, r in enumerate(val[::9]):
        (calibration / f"{i:04d}-{Path(r['path']).name}").symlink_to(r["path"])
    labels = out / "validation.csv"
    labels.write_text("path,label\n" + "".join(f"{r['path']},{r['label']}\n" for r in val))
    report = export_bundle(bundle_dir, torchscript=True, onnx=True, int8=True, calibration=calibration,
                           int8_eval=labels, progress=print)
    gates = {name: {k: a.get(k) for k in ("passed", "max_rel_diff_score", "population_flag_agreement",
                                          "population_score_correlation", "failures")}
             for name, a in report["artifacts"].items()}
    print("gates:", json.dumps(gates), flush=True)
    sets = build_sets(args.work, args.adult if args.adult.exists() else None, 0)
    chest = _dicom_chests(args.adult.parent / "dicom")
    inputs = {"heldout": [r["path"] for r in sets["heldout"]], "adult": [r["path"] for r in sets.get("adult", [])],
              "dicom_chest": chest, **{k: [r["path"] for r in v] for k, v in sets.items()
                                       if k in ("contrast", "gamma", "blur", "exposure")}}
    results = {"fit": record, "gates": gates, "sets": {}}
    scores = {}
    for backend in ("onnx", "onnx-int8"):
        for name, paths in inputs.items():
            if not paths or (backend == "onnx-int8" and (name not in ("heldout", "adult") or
                                                          not ModelBundle.load(bundle_dir).has("model.int8.onnx"))):
                continue
            listing, csv_out = out / f"{name}.txt", out / f"{name}.{backend}.csv"
            listing.write_text("".join(p + "\n" for p in paths))
            csv_out.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "cxr_deploy", "batch", f"@{listing}", "-m", str(bundle_dir), "-o", str(csv_out),
                   "--backend", backend, "--workers", "1", "--threads", "1"]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=False)
            got = [r for r in iter_results(csv_out) if r["status"] == "ok"]
            s = np.array([float(r["population_score"]) for r in got])
            flagged = np.array([r["in_population"] == "no" for r in got])
            scores[(backend, name)] = s
            entry = {"n": len(got), "flagged": float(flagged.mean()) if len(got) else None,
                     "flagged_by_score": float((s > record["threshold"]).mean()) if len(got) else None,
                     "reasons": sorted({r["population_reason"] for r in got if r["population_reason"]})[:5]}
            if name != "heldout" and len(got) and len(scores[(backend, "heldout")]):
                h = scores[(backend, "heldout")]
                entry["auroc_vs_heldout"] = float(roc_auc_score(np.r_[np.zeros(len(h)), np.ones(len(s))], np.r_[h, s]))
            results["sets"][f"{name} ({backend})"] = entry
            print(name, backend, json.dumps(entry), flush=True)
    (out / "ood_product.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _dicom_chests(root: Path) -> list[str]:
    """The frontal chest radiographs among the DICOM test files (manifest: CR/DX, CHEST/THORAX, decodes)."""
    if not (root / "manifest.csv").exists():
        return []
    with open(root / "manifest.csv", newline="") as fh:
        return [str(root / r["file"]) for r in csv.DictReader(fh)
                if r["modality"] in ("CR", "DX") and r["body_part"] in ("CHEST", "THORAX") and r["decode_status"] == "ok"]


def cli(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/kermany-quality"))
    parser.add_argument("--adult", type=Path, default=Path("../shared/data/adult_cxr"))
    parser.add_argument("--product", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="--product: where to write (default WORK/ood)")
    parser.add_argument("--quantile", type=float, default=95.0)
    args, rest = parser.parse_known_args(argv)
    if not args.product:
        return main(argv)
    args.out = args.out or args.work / "ood"
    product(args)


if __name__ == "__main__":
    cli()
