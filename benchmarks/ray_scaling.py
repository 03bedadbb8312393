"""Scaling of ``cxr-deploy batch --engine ray`` with the CPUs of the Ray cluster (1 vs 2), beside the
local engine on the same images.

Runs N real CXRs from ``../shared/data/cxr`` (JPEG, original resolution) through a ResNet50 bundle at
224 px (fp32 ONNX on the CPU; random-init unless ``--bundle``: speed does not depend on the
weights). Each figure comes from a fresh process: a local Ray cluster started with ``num_cpus=K``
(start-up reported apart), then one ``run_batch_ray`` over the N images, timed from the call to the
merged CSV — so the rate includes starting the actors and loading the model in each, as every real
run does. Rows are checked against the local engine's (same rows, same order).

Usage::

    python benchmarks/ray_scaling.py              # N=64, CPUs 1 and 2
    python benchmarks/ray_scaling.py --n 128 --cpus 1,2 --bundle trained_bundle/

On a machine shared with other work the figures are noisy: run it twice.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data"))


def make_bundle(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from batch_throughput import make_bundle as _make

    return _make(root, root, 224, int8=False)


def measure(engine: str, cpus: int, listing: Path, bundle: Path, out: Path, batch_size: int) -> dict:
    from cxr_deploy.batch.runner import run_batch
    from cxr_deploy.batch.settings import BatchConfig

    config = BatchConfig(inputs=[f"@{listing}"], model=bundle, out=out, batch_size=batch_size, progress=False)
    if engine == "local":
        start = time.perf_counter()
        summary = run_batch(config)
        return {"engine": "local", "seconds": time.perf_counter() - start, "rows": summary.processed}
    import ray

    from cxr_deploy.batch.ray_engine import run_batch_ray

    temp = tempfile.mkdtemp(prefix="cxr-rb-", dir="/tmp")  # short: Ray's unix sockets live under it
    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    started = time.perf_counter() - start
    try:
        start = time.perf_counter()
        summary = run_batch_ray(config)
        return {"engine": f"ray cpus={cpus}", "seconds": time.perf_counter() - start, "rows": summary.processed,
                "cluster_start_s": started}
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="images (default 64)")
    ap.add_argument("--cpus", default="1,2", help="Ray cluster sizes to measure (default 1,2)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--bundle", type=Path, default=None, help="exported bundle (default: random-init ResNet50, 224 px)")
    ap.add_argument("--measure", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        engine, cpus, listing, bundle, out = args.measure
        print(json.dumps(measure(engine, int(cpus), Path(listing), Path(bundle), Path(out), args.batch_size)))
        return
    work = Path(tempfile.mkdtemp(prefix="cxr-ray-bench-"))
    images = sorted(p for p in (DATA / "cxr").rglob("*.jpeg"))[: args.n]
    if len(images) < args.n:
        sys.exit(f"need {args.n} images under {DATA / 'cxr'}, found {len(images)}")
    listing = work / "inputs.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    bundle = args.bundle or make_bundle(work)
    runs = [("local", 0)] + [("ray", int(c)) for c in args.cpus.split(",")]
    print(f"{args.n} CXRs from {DATA / 'cxr'}, ResNet50 224 px fp32 ONNX on CPU, batch {args.batch_size}, "
          f"{os.cpu_count()} cores here")
    try:
        _compare(runs, work, listing, bundle, args.batch_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _compare(runs, work: Path, listing: Path, bundle: Path, batch_size: int) -> None:
    reference = None
    for engine, cpus in runs:
        out = work / f"{engine}{cpus}.csv"
        proc = subprocess.run([sys.executable, __file__, "--batch-size", str(batch_size), "--measure", engine,
                               str(cpus), str(listing), str(bundle), str(out)],
                              capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows = [{k: v for k, v in r.items() if k != "processed_at"} for r in _read(out)]
        reference = reference or rows
        extra = f", cluster start {result['cluster_start_s']:.1f} s apart" if "cluster_start_s" in result else ""
        print(f"{result['engine']:>12}: {result['rows'] / result['seconds']:6.2f} img/s "
              f"({result['rows']} rows in {result['seconds']:.1f} s{extra}); rows identical to local: {rows == reference}")


def _read(path: Path) -> list[dict]:
    from cxr_deploy.batch.results_file import read_results

    return read_results(path)


if __name__ == "__main__":
    main()
