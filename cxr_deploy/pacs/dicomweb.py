"""A DICOMweb client (``dicomweb-client``) set up from the config: https verification, auth,
timeouts (:mod:`.network`) and no HTTP compression."""

from __future__ import annotations

from .config import Auth, PacsConfigError, Remote
from .network import CONNECT_TIMEOUT, READ_TIMEOUT


def make_client(remote: Remote):
    import requests
    from dicomweb_client.api import DICOMwebClient

    if not remote.dicomweb_url:
        raise PacsConfigError("[pacs] dicomweb_url is not set")
    session = requests.Session()
    # No gzip: requests asks for it by default and Orthanc then compresses every instance it sends,
    # 0.3 s of its CPU for a 1.5 MiB DX (8 ms uncompressed, as curl asks); DICOM pixel data gains
    # little from it on a hospital network.
    session.headers["Accept-Encoding"] = "identity"
    if remote.ca_file:
        session.verify = remote.ca_file
    if remote.auth == Auth.BASIC:
        session.auth = (remote.username, remote.secret)
    elif remote.auth == Auth.BEARER:
        session.headers["Authorization"] = f"Bearer {remote.secret}"
    client = DICOMwebClient(url=remote.dicomweb_url, session=session, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
    # dicomweb-client retries any failed request itself (5 tries, 2 to 16 s apart: 30 s on a refused
    # connection, a refusal included); the retries are ours to decide (.network), once.
    client.set_http_retry_params(retry=False)
    return client
