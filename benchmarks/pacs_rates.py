"""PACS transfer figures against a real local Orthanc (Debian's orthanc + orthanc-dicomweb, dcmtk):

- pull: QIDO-RS + WADO-RS into the spool (instances/s);
- push: STOW-RS and C-STORE of the SR + SC results (instances/s);
- listen, receive: C-STORE receive rate of ``pacs listen`` over one association (storescu sending a
  burst), next to Orthanc's own C-STORE receive rate for the same files, measured in the same run;
- listen, burst: the rate at which ``pacs listen`` scores a burst (first byte sent -> last row in
  its CSV, and -> last SR stored in Orthanc), next to ``cxr-deploy batch --dicom-out`` on the same
  files (its own images/s, and its wall time with start-up);
- listen, one at a time: storescu sends one image, the SR is found in Orthanc (median, p95).

    python benchmarks/pacs_rates.py [--n 40] [--burst 50] [--single 20] [--bundle BUNDLE]

Everything runs on 127.0.0.1; Orthanc and the listener are started and stopped here; the load
(``/proc/loadavg``) is printed before and after, since other work on the machine moves the figures.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.pacs.conftest import Orthanc, free_port  # noqa: E402  (the tests' Orthanc launcher)

STORESCU = "/usr/bin/storescu"


def make_instances(folder: Path, n: int) -> list[Path]:
    """``n`` distinct 1024-px DX instances (about 1 MB each) in one study."""
    base = pydicom.dcmread(ROOT / "samples" / "dicom" / "IM000004")
    study = pydicom.uid.generate_uid()
    paths = []
    for i in range(n):
        ds = base.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, pydicom.uid.generate_uid(entropy_srcs=[study, "s"])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.PixelData = np.roll(base.pixel_array, 13 * i, axis=1).astype(np.uint16).tobytes()
        path = folder / f"im{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def config(folder: Path, orthanc: Orthanc, push: str, listen_port: int) -> Path:
    path = folder / f"pacs-{push}.toml"
    path.write_text(f'[local]\nae_title = "CXRDEPLOY"\nspool = "{folder / "spool"}"\n\n[pacs]\n'
                    f'ae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
                    f'dicomweb_url = "{orthanc.url}/dicom-web"\npush = "{push}"\n\n[listen]\n'
                    f'port = {listen_port}\nallowed_ae_titles = ["STORESCU"]\n')
    return path


def tiny_bundle(folder: Path) -> Path:
    from cxr_deploy.bundle import save_bundle
    from cxr_deploy.export import export_bundle
    from cxr_deploy.model import build_model
    from cxr_deploy.preprocessing import PreprocessSpec

    bundle = folder / "bundle"
    save_bundle(bundle, build_model(None), spec=PreprocessSpec(input_size=224))
    export_bundle(bundle, torchscript=False, onnx=True)
    return bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--burst", type=int, default=50, help="instances in the listener's burst")
    parser.add_argument("--single", type=int, default=20, help="instances sent one at a time")
    parser.add_argument("--bundle", type=Path, default=None, help="default: a random-weight bundle at 224 px")
    args = parser.parse_args()
    from cxr_deploy.pacs.config import load_pacs_config
    from cxr_deploy.pacs.transfer import pull, push

    work = Path(tempfile.mkdtemp(prefix="cxr-pacs-bench-"))
    orthanc = Orthanc(work / "orthanc")
    try:
        files = make_instances(work, args.n)
        size = sum(p.stat().st_size for p in files) / len(files) / 2**20
        print(f"# {args.n} DX instances of {size:.2f} MiB; Orthanc {orthanc.url}; {os.cpu_count()} cores; "
              f"load {_load()}")
        t0 = time.perf_counter()
        for path in files:
            orthanc.upload(path)
        print(f"REST upload to Orthanc (for reference): {args.n / (time.perf_counter() - t0):.1f} instances/s")

        listen_port = free_port()
        stow, cstore = (load_pacs_config(config(work, orthanc, m, listen_port)) for m in ("stow", "cstore"))
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        summary = pull(stow, study_uid=study)
        print(f"pacs pull (QIDO-RS + WADO-RS): {summary.counts['done'] / summary.seconds:.1f} instances/s "
              f"({summary.counts})")

        bundle = args.bundle or tiny_bundle(work)
        results = work / "results"
        subprocess.run([sys.executable, "-m", "cxr_deploy.cli", "batch", str(work / "spool"), "--model", str(bundle),
                        "--out", str(work / "r.csv"), "--dicom-out", str(results), "--no-progress"], check=True,
                       capture_output=True)
        outputs = sorted(results.glob("*.dcm"))
        for name, cfg in (("STOW-RS", stow), ("C-STORE", cstore)):
            log_dir = work / f"log-{name}"
            log_dir.mkdir()
            summary = push(cfg, outputs, log_dir=log_dir)
            print(f"pacs push ({name}, SR + SC): {summary.counts['done'] / summary.seconds:.1f} instances/s "
                  f"({summary.counts})")

        listen_figures(work, orthanc, bundle, args.burst, args.single)
    finally:
        orthanc.stop()


def _storescu(port: int, files: list[Path]) -> float:
    """Seconds storescu takes to send ``files`` over one association."""
    t0 = time.perf_counter()
    subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "CXRDEPLOY", "127.0.0.1", str(port), *map(str, files)],
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def _rows(csv: Path) -> int:
    return max(0, len(csv.read_text().splitlines()) - 1) if csv.exists() else 0


def _wait(condition, timeout: float = 600) -> float:
    """perf_counter() once ``condition()`` holds (polled every 20 ms)."""
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError("the listener did not finish in time")
        time.sleep(0.02)
    return time.perf_counter()


def listen_figures(work: Path, orthanc: Orthanc, bundle: Path, n_burst: int, n_single: int) -> None:
    from cxr_deploy.pacs.listen import wait_for_port

    burst = work / "burst"
    burst.mkdir()
    files = make_instances(burst, n_burst)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cxr_deploy.cli", "batch", str(burst), "--model", str(bundle),
                           "--out", str(work / "burst.csv"), "--dicom-out", str(work / "burst-results"),
                           "--no-progress"], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rate = float(done.stderr.split(" images/s")[0].rsplit("(", 1)[1])
    print(f"batch --dicom-out, {n_burst} instances: {rate:.1f} images/s (its summary), "
          f"{n_burst / wall:.1f} images/s with start-up ({wall:.1f} s)")
    orthanc_seconds = _storescu(orthanc.dicom_port, files)
    print(f"Orthanc's own C-STORE receive (storescu, one association): {n_burst / orthanc_seconds:.1f} instances/s")
    orthanc.delete_all()

    folder = work / "listen"
    folder.mkdir()
    listen_port = free_port()
    cfg = config(folder, orthanc, "cstore", listen_port)
    log = open(folder / "listen.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "pacs", "listen", "--config", str(cfg),
                             "--model", str(bundle)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", listen_port, timeout=120)  # the model is loaded before the port opens
        csv = folder / "spool" / "results.csv"
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        t0 = time.perf_counter()
        receive = _storescu(listen_port, files)
        scored = _wait(lambda: _rows(csv) >= n_burst) - t0
        stored = _wait(lambda: _sr_count(orthanc, study) >= n_burst) - t0
        print(f"pacs listen, C-STORE receive (storescu, one association, scoring as it arrives): "
              f"{n_burst / receive:.1f} instances/s = {orthanc_seconds / receive:.2f}x Orthanc's")
        print(f"pacs listen, burst of {n_burst}: scored at {n_burst / scored:.1f} images/s = "
              f"{(n_burst / scored) / rate:.2f}x batch --dicom-out's ({scored:.1f} s from the first byte sent); "
              f"all {n_burst} SRs stored in Orthanc after {stored:.1f} s")
        latencies = []
        for k in range(n_single):
            (work / "single" / str(k)).mkdir(parents=True)
            (path,) = make_instances(work / "single" / str(k), 1)  # its own study
            uid = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
            t0 = time.perf_counter()
            _storescu(listen_port, [path])
            latencies.append(_wait(lambda: _sr_count(orthanc, uid) >= 1, timeout=120) - t0)
            time.sleep(0.3)  # one at a time: the SC and the population check of this one are done
        latencies.sort()
        p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
        print(f"pacs listen end to end (sent -> SR stored in Orthanc), {n_single} images one at a time: "
              f"median {statistics.median(latencies):.2f} s, p95 {p95:.2f} s, max {latencies[-1]:.2f} s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()
    print(f"# load after: {_load()}; listener log: {folder / 'listen.log'}")


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _sr_count(orthanc: Orthanc, study_uid: str) -> int:
    import requests

    reply = requests.post(f"{orthanc.url}/tools/find", json={"Level": "Instance", "Query": {
        "StudyInstanceUID": study_uid, "Modality": "SR"}}, timeout=10)
    return len(reply.json()) if reply.ok else 0


if __name__ == "__main__":
    main()
