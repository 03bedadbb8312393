"""``pacs pull`` rate against a real local Orthanc (Debian's orthanc + orthanc-dicomweb): QIDO-RS
search + WADO-RS retrieve of N distinct DX instances (about 1 MB each, as ``pacs_rates.py`` makes
them) into an empty spool, for each ``--parallel`` value given.

    python benchmarks/pacs_pull_rate.py [--n 40] [--parallel 1 4 8]

Everything runs on 127.0.0.1; Orthanc is started and stopped here.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.pacs_rates import config, make_instances  # noqa: E402
from tests.pacs.conftest import Orthanc, free_port  # noqa: E402  (the tests' Orthanc launcher)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    from cxr_deploy.pacs.config import load_pacs_config
    from cxr_deploy.pacs.transfer import pull

    work = Path(tempfile.mkdtemp(prefix="cxr-pull-bench-"))
    orthanc = Orthanc(work / "orthanc")
    try:
        files = make_instances(work, args.n)
        for path in files:
            orthanc.upload(path)
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        size = sum(p.stat().st_size for p in files) / len(files) / 2**20
        print(f"# {args.n} DX instances of {size:.2f} MiB; Orthanc {orthanc.url}; {os.cpu_count()} cores")
        cfg = load_pacs_config(config(work, orthanc, "stow", free_port()))
        has_parallel = "parallel" in inspect.signature(pull).parameters
        for parallel in args.parallel if has_parallel else [1]:
            shutil.rmtree(cfg.local.spool, ignore_errors=True)
            summary = pull(cfg, study_uid=study, **({"parallel": parallel} if has_parallel else {}))
            print(f"pacs pull (QIDO-RS + WADO-RS), {parallel} at a time: "
                  f"{summary.counts['done'] / summary.seconds:.1f} instances/s ({summary.counts})")
    finally:
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
