"""Example PACS-side script: nightly batch over an export folder, then flag positives.

    python examples/pacs_script.py /mnt/pacs_export/2026-11-25 --model /opt/cxr/bundle --out /var/cxr/2026-11-25.csv

- Re-running the same command after a crash or reboot continues where it stopped (``resume=True``):
  no file is predicted twice, none is missed.
- Exit code: 0 all inputs ok, 3 some inputs unreadable (see the CSV's error column), 2 setup error.
- ``--quick FILE...`` instead predicts a few files in-process with ``Model.predict``.

Decision support only: the model's output is a probability for a radiologist to weigh, not a
diagnosis.
"""

from __future__ import annotations

import argparse
import sys

import cxr_deploy
from cxr_deploy.batch.results_file import iter_results


def nightly(inputs: list[str], model: str, out: str, overlays: str | None) -> int:
    summary = cxr_deploy.run_batch(inputs, model=model, out=out, resume=True,
                                   cam_dir=overlays, cam_for="positive")
    for line in summary.lines():
        print(line, file=sys.stderr)
    # Read back through iter_results: it undoes the CSV's spreadsheet formula guard on paths.
    for row in iter_results(out):
        if row["status"] == "ok" and row["predicted_label"] == "PNEUMONIA":
            # Hand over to your worklist / HL7 / DICOM SR tooling here, keyed by the UIDs.
            print(f"FLAG\t{row['study_instance_uid'] or row['path']}\t{float(row['probability']):.3f}\t"
                  f"{row['overlay_path']}")
        elif row["status"] == "error":
            print(f"UNREADABLE\t{row['path']}\t{row['error']}", file=sys.stderr)
    return summary.exit_code


def quick(files: list[str], model_dir: str) -> int:
    model = cxr_deploy.load(model_dir)  # ONNX Runtime; CUDA when usable, else CPU
    failed = 0
    for record in model.predict(files):
        if record["status"] == "ok":
            print(f"{record['path']}\t{record['predicted_label']}\t{record['probability']:.3f}")
        else:
            failed += record["status"] == "error"
            print(f"{record['path']}\t{record['status'].upper()}\t{record['error']}")
    return 3 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="folders, files or @list.txt")
    ap.add_argument("--model", required=True, help="model bundle directory")
    ap.add_argument("--out", help="results CSV (nightly mode)")
    ap.add_argument("--overlays", help="folder for Grad-CAM overlays of positive images")
    ap.add_argument("--quick", action="store_true", help="predict the given files in-process and print")
    args = ap.parse_args()
    try:
        if args.quick:
            return quick(args.inputs, args.model)
        if not args.out:
            ap.error("--out is required (or use --quick)")
        return nightly(args.inputs, args.model, args.out, args.overlays)
    except cxr_deploy.BundleError as exc:
        print(f"model bundle problem: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # setup problems (bad options, unusable backend) are reported, not traced
        from cxr_deploy.errors import CxrDeployError

        if isinstance(exc, CxrDeployError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # required: run_batch's decode workers are spawned processes
    sys.exit(main())
