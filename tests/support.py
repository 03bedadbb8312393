"""Helpers the tests share: paths to the samples and the real data, the CLI as a subprocess, small
image writers, process and port helpers. Test modules import these from here, never from a conftest
or from one another; the conftest files turn them into fixtures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "samples"
SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")
TINY_INPUT_SIZE = 64  # ResNet50 at 64 px: a few ms per image, CAM grid 2x2
# The named operating points the ``points_bundle`` fixture records, as training does.
POINTS = {"sens95": {"threshold": 0.25, "sensitivity": 0.95, "specificity": 0.4},
          "youden": {"threshold": 0.45, "sensitivity": 0.8, "specificity": 0.7}}


def run_cli(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    """``cxr-deploy`` as a real subprocess (the way cron runs it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cxr_deploy.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def smooth_image(seed: int, shape=(96, 80)) -> np.ndarray:
    """Smooth anatomy-like uint8 content (blurred blobs), different per seed."""
    rng = np.random.default_rng(seed)
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros(shape, np.float32)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 30)
        img += rng.uniform(0.3, 1.0) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    img = img / img.max()
    return np.round(img * 255).astype(np.uint8)


def write_pngs(folder: Path, n: int, start: int = 0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(smooth_image(i)).save(path)
        paths.append(path)
    return paths


def session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: what a batch run started and left behind."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: session id
                found.append(int(entry))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sr_items(dataset):
    """Every SR content item, depth first."""
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from sr_items(item)


def pacs_config(tmp_path: Path, orthanc, push: str = "stow", **extra) -> Path:
    """A ``pacs.toml`` for the test Orthanc: spool under ``tmp_path``, ``[pacs]`` extras as given."""
    lines = ["[local]", 'ae_title = "CXRDEPLOY"', f'spool = "{tmp_path / "spool"}"', "", "[pacs]",
             f'ae_title = "{orthanc.aet}"', 'host = "127.0.0.1"', f"port = {orthanc.dicom_port}",
             f'dicomweb_url = "{orthanc.url}/dicom-web"', f'push = "{push}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path = tmp_path / "pacs.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def dicom_sample(manifest: list[dict], root: Path, undecodable: bool = True) -> list[Path]:
    """The shared DICOMs a pixel test needs: one decodable file per kind of stored pixels
    (photometric, bits allocated/stored, sign, samples per pixel, transfer syntax, and whether a
    modality LUT and a VOI window apply: 86 kinds among the 152 decodable files), plus, with
    ``undecodable``, every file that does not decode (refused before any pixel work, so cheap). The
    other files of a kind take the same code path; the reader's own tests read every file."""
    kinds, broken = {}, []
    for row in manifest:
        if not row["file"].endswith(".dcm"):
            continue
        if row["decode_status"] != "ok":
            broken.append(root / row["file"])
            continue
        kind = (row["photometric"], row["bits_allocated"], row["bits_stored"], row["pixel_representation"],
                row["samples_per_pixel"], row["transfer_syntax"].split(" ")[0],
                row["rescale_slope"] not in ("", "1"), bool(row["window_center"]))
        kinds.setdefault(kind, root / row["file"])
    return sorted(kinds.values()) + (sorted(broken) if undecodable else [])


# dcmtk's storescu (pynetdicom installs an unrelated 'storescu' script into the virtual environment)
STORESCU = __import__("shutil").which("storescu", path="/usr/bin:/usr/local/bin:/bin")


def start_listener(tmp_path: Path, orthanc, bundle, port: int, *, flags: tuple = (),
                   **limits) -> tuple[subprocess.Popen, Path]:
    """A real ``pacs listen`` (own session, log in ``tmp_path/listen.log``) for the test Orthanc,
    allowing STORESCU and ORTHANC; ``limits``: extra ``[listen]`` keys, TOML values as written;
    ``flags``: extra command-line arguments."""
    from cxr_deploy.pacs.listen import wait_for_port

    config = pacs_config(tmp_path, orthanc, push="cstore")
    extra = "\n".join(f"{k} = {v}" for k, v in limits.items())
    config.write_text(config.read_text() + f'\n[listen]\nport = {port}\nallowed_ae_titles = ["STORESCU", "ORTHANC"]\n'
                      + extra + "\n")
    log = open(tmp_path / "listen.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "pacs", "listen", "--config", str(config),
                             "--model", str(bundle), "--interval", "0.2", "-j", "0", *map(str, flags)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_port("127.0.0.1", port, timeout=60)
    return proc, config


def distinct_instances(folder: Path, n: int, start: int = 0) -> list[Path]:
    """``n`` distinct instances (own SOP Instance UID and pixels) of IM000004's study, in ``folder``."""
    import pydicom

    base = pydicom.dcmread(SAMPLES / "dicom" / "IM000004")
    paths = []
    for i in range(start, start + n):
        ds = base.copy()
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["cxr-deploy-test", str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PixelData = np.roll(base.pixel_array, 40 * i, axis=1).astype(np.uint16).tobytes()
        path = folder / f"im{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def wait_for(condition, what: str, timeout: float = 90):
    """``condition()``'s first true value, polled every 0.2 s; AssertionError naming ``what`` after
    ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def wait_rows(csv: Path, n: int, timeout: float = 120) -> list[dict]:
    """The rows of the results CSV ``csv`` once it has at least ``n`` (a listener writes them)."""
    import time

    from cxr_deploy.batch.results_file import read_results

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if csv.exists():
            rows = read_results(csv)
            if len(rows) >= n:
                return rows
        time.sleep(0.2)
    raise AssertionError(f"{csv}: fewer than {n} rows after {timeout} s")


def storescu(port: int, path: Path, aet: str = "STORESCU") -> str:
    """dcmtk's storescu sends ``path`` to the listener on ``port``; its output (``-v``)."""
    import pydicom

    # one transfer syntax per call: storescu offers uncompressed syntaxes unless told otherwise
    ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    flag = {"1.2.840.10008.1.2.4.50": ["-xy"], "1.2.840.10008.1.2.4.70": ["-xs"]}.get(str(ts), [])
    # -ta 5: storescu's ACSE timeout (default 30 s); a listener that stopped answering fails in 5 s
    proc = subprocess.run(["setpriv", "--pdeathsig", "KILL", STORESCU, "-v", "-ta", "5", *flag, "-aet", aet, "-aec",
                           "CXRDEPLOY", "127.0.0.1", str(port), str(path)], capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


def stop_process(proc: subprocess.Popen) -> int:
    """SIGTERM to the process group (SIGKILL after 30 s); its exit code."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()
    return proc.returncode


def self_signed_cert(folder: Path) -> tuple[Path, Path] | str:
    """A throw-away certificate for 127.0.0.1 made by ``openssl``: (cert, key), or why not (a str)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                               "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                               "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, timeout=60)
    except FileNotFoundError:
        return "openssl is not installed"
    if made.returncode:
        return f"openssl cannot make a test certificate: {made.stderr.decode()[-200:]}"
    return cert, key


def start_tls_listener(tmp_path: Path, bundle, port: int, cert: Path, key: Path, allowed: list[str],
                       listen_extra: str = "") -> tuple[subprocess.Popen, Path]:
    """``pacs listen --no-push`` serving DICOM TLS on ``port`` with ``cert``/``key``, its ``[pacs]``
    pointing back at itself over TLS (so ``push`` with this config sends to it). Stop it with
    :func:`stop_process`; its log is ``tmp_path / "listen.log"``."""
    config = tmp_path / "tls.toml"
    config.write_text(f'[local]\nae_title = "CXRDEPLOY"\nspool = "{tmp_path / "spool"}"\n\n'
                      f'[listen]\nport = {port}\nallowed_ae_titles = {json.dumps(allowed)}\n{listen_extra}'
                      f'tls_cert = "{cert}"\ntls_key = "{key}"\n\n'
                      f'[pacs]\nae_title = "CXRDEPLOY"\nhost = "127.0.0.1"\nport = {port}\npush = "cstore"\n'
                      f'tls = true\nca_file = "{cert}"\n')
    log = open(tmp_path / "listen.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "pacs", "listen", "--config", str(config),
                             "--model", str(bundle), "--no-push", "-j", "0"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()  # the child holds its own copy
    return proc, config


def write_old_layout(results_csv: Path, out: Path, columns, version: int, rows: int | None = None) -> None:
    """A results CSV as an older cxr-deploy wrote it: ``columns`` (``COLUMNS_V1``/``COLUMNS_V2``),
    the first ``rows`` rows of ``results_csv`` (all when None), ``schema_version`` = ``version``."""
    import csv

    with open(results_csv, newline="") as fh:
        records = list(csv.DictReader(fh))[:rows]
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(columns)
        for record in records:
            writer.writerow([version if c == "schema_version" else record[c] for c in columns])


@contextmanager
def small_filesystem(folder: Path, size: str) -> Iterator[Path]:
    """``with small_filesystem(folder, "2m"):`` a tmpfs of that size mounted on ``folder`` (made if
    missing), unmounted on exit: a disk that fills up for real, not the machine's. Skips the test
    where mounting is not permitted (not root, or no CAP_SYS_ADMIN); CI runs as root."""
    import pytest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a {size} tmpfs (needs root): {made.stderr.strip()[:200]}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill_filesystem(path: Path) -> Path:
    """Write ``path`` until its file system has no byte left (ENOSPC); returns it."""
    import errno

    chunk = b"\xff" * 65536
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        try:
            while True:
                fh.write(b"\xff" * 512)
        except OSError:
            pass
    return path


def sized_instance(path: Path, side: int, sop_uid: str | None = None) -> Path:
    """A valid 16-bit chest DICOM of ``side`` x ``side`` pixels (``side`` = 5480: 60 MB), built from
    samples/dicom/IM000004 with a new SOP Instance UID."""
    import pydicom

    ds = pydicom.dcmread(SAMPLES / "dicom" / "IM000004")
    ds.SOPInstanceUID = sop_uid or pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ramp = np.arange(side, dtype=np.uint32)
    ds.PixelData = ((ramp[:, None] + 3 * ramp[None, :]) % 4096).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
def kermany_images(shared_data: Path, per_class: int, skip: int = 0) -> list[tuple[str, int]]:
    """``per_class`` real pediatric films of each class from kermany224/ (after the first ``skip``
    of each, in file order): (path, label index, NORMAL 0 / PNEUMONIA 1)."""
    root = shared_data / "kermany224" / "train"
    out = []
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        out += [(str(p), label) for p in sorted((root / name).glob("*.jpeg"))[skip:skip + per_class]]
    return out


def adult_images(shared_data: Path, n: int) -> list[str]:
    """``n`` adult chest films from other hospitals (adult_cxr/, every 4th of the sorted files)."""
    return [str(p) for p in sorted((shared_data / "adult_cxr" / "images").glob("*.png"))[::4][:n]]


SHARED_BUILDS = "built-once"  # folder of the test session's shared builds (see built_once)


def shared_builds_root(tmp_path_factory) -> Path:
    """Where :func:`built_once` keeps its builds: the whole test session's temporary folder, which
    every pytest-xdist worker's own folder sits in (``pytest-N/popen-gwK``); without xdist, the
    session's folder itself."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / SHARED_BUILDS


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` run once per test session, whichever xdist worker asks first; the others wait
    for it (a file lock) and use the same folder. For what is costly and only read afterwards: a
    session fixture is otherwise built again by every worker (the tiny bundle's ResNet50 export took
    23-27 s on each of the 2 workers). A build that raises leaves nothing marked done, so the next
    worker tries again and fails the same way, each with the real error."""
    from filelock import FileLock

    root = shared_builds_root(tmp_path_factory)
    root.mkdir(parents=True, exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock"), timeout=1800):  # filelock.Timeout, not a hung session
        if not done.exists():
            if folder.exists():  # a build that failed half-way in another worker
                import shutil

                shutil.rmtree(folder)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder
