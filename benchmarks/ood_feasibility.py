"""Feasibility of issue 20's per-image out-of-population flag (item 3, not built yet): does the
Mahalanobis distance of the pooled ResNet50 features from the training population separate adult
films from held-out pediatric ones, at a threshold that flags few in-population images?

    python benchmarks/ood_feasibility.py --work runs/kermany-quality [--train-images 1000]

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


if __name__ == "__main__":
    main()
