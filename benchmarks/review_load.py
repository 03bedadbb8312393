"""Time to first page of ``cxr-deploy review`` on a 100,000-row results CSV.

Builds the CSV (the real writer, schema v3; paths under one made-up folder; 2 % error rows), starts
the real command as a subprocess, and measures from the process start to the first page of rows
(``/api/rows``, 50 rows, what the page asks first) and to a page sorted by probability with a
filter once every row is read. The server answers while a large file is still being read (first
chunk 2,000 rows), so the first page does not wait for the last row. Prints the figures.

    python benchmarks/review_load.py [--rows 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def build_csv(path: Path, n: int) -> None:
    from cxr_deploy.batch.results_file import ResultsWriter

    rng = random.Random(0)
    rows = []
    for i in range(n):
        if i % 50 == 7:
            rows.append({"path": f"/data/night/IM-{i:06d}.dcm", "status": "error", "error": "truncated DICOM",
                         "model_id": "0123456789abcdef", "threshold": 0.5, "operating_point": "default"})
            continue
        p = rng.random()
        rows.append({"path": f"/data/night/IM-{i:06d}.dcm", "status": "ok", "probability": p,
                     "predicted_label": "PNEUMONIA" if p >= 0.5 else "NORMAL", "threshold": 0.5,
                     "sop_instance_uid": f"1.2.826.0.1.3680043.8.498.{i}", "format": "dicom",
                     "model_id": "0123456789abcdef", "backend": "onnx:cpu",
                     "overlay_path": f"/data/night/overlays/1.2.826.0.1.3680043.8.498.{i}.png",
                     "processed_at": "2026-12-01T02:00:00+00:00", "modality": "DX", "operating_point": "default"})
    with ResultsWriter(path, fsync=False) as writer:
        writer.write_rows(rows)


def get(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def one_run(csv_path: Path) -> dict:
    started = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "review", str(csv_path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        url = line.split("review: ", 1)[1].strip()
        printed = time.perf_counter() - started
        base, token = url.split("/?token=")
        first = get(f"{base}/api/rows?offset=0&limit=50", token)
        while not first["rows"]:  # the first chunk not read yet
            time.sleep(0.02)
            first = get(f"{base}/api/rows?offset=0&limit=50", token)
        first_page = time.perf_counter() - started
        while not get(f"{base}/api/meta", token)["loading"]["done"]:
            time.sleep(0.05)
        all_read = time.perf_counter() - started
        t = time.perf_counter()
        sorted_page = get(f"{base}/api/rows?offset=0&limit=50&sort=probability&desc=1&status=ok&pmin=0.9", token)
        sort_filter = time.perf_counter() - t
        assert sorted_page["rows"] and sorted_page["complete"]
        return {"url_printed_s": printed, "first_page_s": first_page, "all_read_s": all_read,
                "sorted_filtered_page_s": sort_filter}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "results.csv"
        build_csv(csv_path, args.rows)
        print(f"{csv_path.stat().st_size / 1e6:.1f} MB, {args.rows} rows; cores: {os.cpu_count()}, "
              f"load average {os.getloadavg()[0]:.1f}")
        runs = [one_run(csv_path) for _ in range(args.runs)]
    for k, run in enumerate(runs, 1):
        print(f"run {k}: after the process started: URL printed {run['url_printed_s']:.2f} s, first page "
              f"{run['first_page_s']:.2f} s, every row read {run['all_read_s']:.2f} s; then a page sorted by "
              f"probability and filtered over all rows {run['sorted_filtered_page_s'] * 1000:.0f} ms")
    best = min(r["first_page_s"] for r in runs)
    worst = max(r["first_page_s"] for r in runs)
    print(f"time to first page: best {best:.2f} s, worst {worst:.2f} s over {len(runs)} runs")


if __name__ == "__main__":
    main()
