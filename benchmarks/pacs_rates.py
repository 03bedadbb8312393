"""PACS transfer figures against a real local Orthanc (Debian's orthanc + orthanc-dicomweb, dcmtk):

- pull: QIDO-RS + WADO-RS into the spool (instances/s);
- push: STOW-RS and C-STORE of the SR + SC results (instances/s);
- listen: C-STORE receive rate of ``pacs listen`` (storescu sending N instances in one association);
- end-to-end latency of ``pacs listen``: storescu sends one image → the SR is found in Orthanc (QIDO).

    python benchmarks/pacs_rates.py [--n 40] [--bundle BUNDLE]

Everything runs on 127.0.0.1; Orthanc and the listener are started and stopped here.
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
    parser.add_argument("--bundle", type=Path, default=None, help="default: a random-weight bundle at 224 px")
    args = parser.parse_args()
    from cxr_deploy.pacs.config import load_pacs_config
    from cxr_deploy.pacs.listen import wait_for_port
    from cxr_deploy.pacs.transfer import pull, push

    work = Path(tempfile.mkdtemp(prefix="cxr-pacs-bench-"))
    orthanc = Orthanc(work / "orthanc")
    try:
        files = make_instances(work, args.n)
        size = sum(p.stat().st_size for p in files) / len(files) / 2**20
        print(f"# {args.n} DX instances of {size:.2f} MiB; Orthanc {orthanc.url}; {os.cpu_count()} cores")
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

        (work / "listen").mkdir()
        listen_cfg = config(work / "listen", orthanc, "stow", listen_port)
        proc = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "pacs", "listen", "--config", str(listen_cfg),
                                 "--model", str(bundle), "--interval", "0.05"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_port("127.0.0.1", listen_port, timeout=60)
            t0 = time.perf_counter()
            subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "CXRDEPLOY", "127.0.0.1", str(listen_port),
                            *map(str, files)], check=True, capture_output=True)
            print(f"pacs listen, C-STORE receive (storescu, one association): "
                  f"{args.n / (time.perf_counter() - t0):.1f} instances/s")
            latencies = []
            for k, path in enumerate(make_instances(work / "listen", 5), start=1):
                uid = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
                t0 = time.perf_counter()
                subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "CXRDEPLOY", "127.0.0.1", str(listen_port),
                                str(path)], check=True, capture_output=True)
                while _sr_count(orthanc, uid) < k and time.perf_counter() - t0 < 120:  # the k-th SR of the study
                    time.sleep(0.02)
                latencies.append(time.perf_counter() - t0)
            print(f"pacs listen end to end (sent -> SR stored in Orthanc; --interval 0.05), 5 images one at a time: "
                  f"median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    finally:
        orthanc.stop()


def _sr_count(orthanc: Orthanc, study_uid: str) -> int:
    import requests

    reply = requests.post(f"{orthanc.url}/tools/find", json={"Level": "Instance", "Query": {
        "StudyInstanceUID": study_uid, "Modality": "SR"}}, timeout=10)
    return len(reply.json()) if reply.ok else 0


if __name__ == "__main__":
    main()
