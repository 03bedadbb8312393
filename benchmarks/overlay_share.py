"""What Grad-CAM overlays cost a ``cxr-deploy batch`` run: the same inputs scored CSV-only and with an
overlay for every image, alternately, ``--repeat`` times each, in one session (so a machine's load
weighs on both alike). To measure an older checkout: ``cd /tmp && PYTHONPATH=/path/to/old python
/path/to/benchmarks/overlay_share.py`` (the batch subprocesses then run the old package); prints each run's images/s and the median share of throughput the overlays
take, ``1 - rate(overlays) / rate(CSV only)``, and the CPU time per image the process tree used
(main process and decode workers, user + system, from ``getrusage``). On a machine shared with other
work the rates swing with its load; the CPU time barely does, and on a run that keeps every core busy
(as batch does) the throughput share follows the CPU share.

Inputs are batch_throughput.py's: 1024² 8-bit PNGs and 2048² 16-bit DICOMs with chest-like content,
and its random-init bundle (fp32 ONNX + INT8) at 224². ``--cam-format`` picks PNG (the default
overlay) or JPEG.

Usage::

    python benchmarks/overlay_share.py [--n 64] [--repeat 3] [--formats png,dicom] [--backend onnx-int8]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_throughput import make_bundle, make_inputs, run_batch_cli  # noqa: E402


def timed(*args, **kwargs) -> dict:
    """run_batch_cli into a fresh output folder, plus the CPU seconds per image its whole process tree
    used."""
    shutil.rmtree(args[3], ignore_errors=True)  # this script's own output folder, made anew each run
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_batch_cli(*args, **kwargs)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dict(result, cpu_ms=1000 * cpu / result["n"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="images per format (default 64)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--formats", default="png,dicom")
    ap.add_argument("--backend", default="onnx-int8")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="cxr-overlay-share-"))
    folders = {fmt: make_inputs(root, fmt, args.n) for fmt in args.formats.split(",")}
    png = folders.get("png") or make_inputs(root, "png", 16)
    bundle = root / "bundle" if (root / "bundle" / "manifest.json").exists() else \
        make_bundle(root, png, 224, int8=args.backend == "onnx-int8")
    print(f"# {args.n} images per format, backend {args.backend}, batch {args.batch_size}, workdir {root}")
    print("format  run  CSV-only: img/s  CPU ms/img   overlays: img/s  CPU ms/img   overlay share: rate  CPU")
    for fmt, folder in folders.items():
        shares, cpu_shares = [], []
        for k in range(args.repeat):
            plain = timed(folder, bundle, args.backend, root / f"plain_{fmt}", args.batch_size, None, cam=False)
            cams = timed(folder, bundle, args.backend, root / f"cams_{fmt}", args.batch_size, None)
            assert cams["overlays"] == args.n, cams
            shares.append(1 - cams["rate"] / plain["rate"])
            cpu_shares.append(1 - plain["cpu_ms"] / cams["cpu_ms"])
            print(f"{fmt:6s}  {k + 1:3d}  {plain['rate']:15.1f}  {plain['cpu_ms']:10.1f}   {cams['rate']:15.1f}  "
                  f"{cams['cpu_ms']:10.1f}   {shares[-1]:18.0%}  {cpu_shares[-1]:4.0%}", flush=True)
        print(f"{fmt:6s}  median overlay share: {statistics.median(shares):.0%} of the rate, "
              f"{statistics.median(cpu_shares):.0%} of the CPU time", flush=True)


if __name__ == "__main__":
    main()
