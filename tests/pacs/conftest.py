"""A real Orthanc for the PACS tests: Debian's ``orthanc`` + ``orthanc-dicomweb`` (``.ci/run``
installs them), started here with its own config, storage in a temp folder, free ports, only local
HTTP clients (``RemoteAccessAllowed: false``), under ``setpriv --pdeathsig KILL`` so a killed test
run leaves no Orthanc behind. Traffic goes to 127.0.0.1 only."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import free_port

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    def __init__(self, folder: Path, **settings):
        """``settings``: Orthanc configuration keys over the defaults below (``LimitFindInstances``,
        ``LuaScripts`` ...)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port, self.aet = free_port(), free_port(), "ORTHANC"
        self.url = f"http://127.0.0.1:{self.http_port}"
        config = {
            "Name": "cxr-deploy-test", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": self.aet, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {}, "StableAge": 1, "ConcurrentJobs": 1, "HttpTimeout": 30, **settings,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.folder = folder
        self.start()

    def start(self) -> None:
        """Start (or start again, after :meth:`stop`: same ports, same storage) and wait for it."""
        self.log = open(self.folder / "orthanc.log", "a")
        self.process = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "Orthanc", str(self.folder / "orthanc.json")],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self) -> None:
        import requests

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "Orthanc exited at start-up; see orthanc.log"
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not answer within 30 s")

    def upload(self, path: Path) -> dict:
        import requests

        reply = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), timeout=30)
        reply.raise_for_status()
        return reply.json()

    def get(self, route: str):
        import requests

        reply = requests.get(f"{self.url}{route}", timeout=30)
        reply.raise_for_status()
        return reply.json()

    def delete_all(self) -> None:
        import requests

        for patient in self.get("/patients"):
            requests.delete(f"{self.url}/patients/{patient}", timeout=30)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    if shutil.which("Orthanc") is None or not PLUGIN.is_file() or shutil.which("setpriv") is None:
        pytest.skip("Orthanc with the DICOMweb plugin is not installed (.ci/run installs orthanc, orthanc-dicomweb)")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def capped_orthanc(orthanc, tmp_path_factory):
    """A second Orthanc as a strict production PACS: its searches return at most 4 results
    (``LimitFindInstances``/``LimitFindResults``: it truncates, and ignores the offset past the cap)
    and it rejects associations called by another AE title than its own."""
    server = Orthanc(tmp_path_factory.mktemp("capped-orthanc"), LimitFindInstances=4, LimitFindResults=4,
                     DicomCheckCalledAet=True)
    yield server
    server.stop()


@pytest.fixture
def own_orthanc(orthanc, tmp_path_factory):
    """An Orthanc for one test, which may stop or kill it (``own_orthanc.process``)."""
    server = Orthanc(tmp_path_factory.mktemp("own-orthanc"))
    yield server
    server.stop()
