"""SIGTERM to a ``cxr-deploy batch`` process group at random moments, over real files; prints the
exit codes seen and checks every CSV left behind (whole rows, no duplicates, complete on --resume).

    python benchmarks/sigterm_random.py --model BUNDLE [--runs 20] [--data ../shared/data]

Inputs (about 150): PNG/JPEG chest films from ``cxr/``, DICOM files from ``dicom/`` (every codec,
non-chest and broken ones: ok, skipped and error rows), and two text files. Each run is killed after
a uniformly random delay between 0 and the length of an uninterrupted run (measured first), then
resumed to completion. Expected: every exit code is 130, or the run's own code (0 or 3) when the
signal came after every output was complete; never 1 (click's ``Aborted!``) or -15 (death by the
signal); every resumed CSV has exactly one row per input.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def make_inputs(data: Path, folder: Path, n_png: int = 100, n_dicom: int = 47) -> int:
    folder.mkdir(parents=True)
    pngs = sorted((data / "cxr").rglob("*.*"))
    pngs = [p for p in pngs if p.suffix.lower() in (".png", ".jpeg", ".jpg")][:n_png]
    for p in pngs:
        shutil.copy(p, folder / f"{p.parent.name}_{p.name}")
    dicoms = sorted(p for p in (data / "dicom").rglob("*") if p.is_file() and p.name != "manifest.csv")
    for i, p in enumerate(random.Random(1).sample(dicoms, n_dicom)):
        shutil.copy(p, folder / f"d{i:03d}_{p.name}")
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "empty.png").write_bytes(b"")
    return len(pngs) + n_dicom + 2


def batch(model: str, folder: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "batch", str(folder), "-m", model, "-o", str(out),
                             "--no-progress", *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def rows(out: Path) -> list[dict]:
    if not out.exists():
        return []
    with open(out, newline="") as fh:
        return list(csv.DictReader(fh))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="sigterm-"))
    n = make_inputs(Path(args.data), work / "in")
    start = time.monotonic()
    full = batch(args.model, work / "in", work / "full.csv", "-j", "2")
    full.communicate(timeout=600)
    length = time.monotonic() - start
    print(f"{n} inputs; an uninterrupted run: exit {full.returncode} in {length:.1f} s")
    codes, bad = Counter(), []
    for run in range(args.runs):
        out = work / f"run{run}.csv"
        delay = rng.uniform(0, length)
        proc = batch(args.model, work / "in", out, "-j", "2")
        time.sleep(delay)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _, err = proc.communicate(timeout=120)
        codes[proc.returncode] += 1
        got = rows(out)
        resumed = batch(args.model, work / "in", out, "-j", "2", "--resume")
        resumed.communicate(timeout=600)
        final = rows(out)
        paths = [r["path"] for r in final]
        ok = (proc.returncode in (0, 3, 130) and "Aborted" not in err and len(paths) == len(set(paths)) == n
              and resumed.returncode in (0, 3))
        print(f"run {run:2d}: SIGTERM after {delay:5.2f} s -> exit {proc.returncode:4d}, {len(got):3d} rows; "
              f"--resume -> exit {resumed.returncode}, {len(final)} rows{'' if ok else '  <-- WRONG'}")
        if not ok:
            bad.append(run)
            print("   stderr: " + " | ".join(err.strip().splitlines()[-6:]))
    print("exit codes:", ", ".join(f"{code}: {count}" for code, count in sorted(codes.items())))
    print("all runs consistent" if not bad else f"inconsistent runs: {bad}")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
