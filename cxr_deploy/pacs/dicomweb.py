"""A DICOMweb client (``dicomweb-client``) set up from the config: https verification and auth."""

from __future__ import annotations

from .config import Auth, PacsConfigError, Remote


def make_client(remote: Remote):
    import requests
    from dicomweb_client.api import DICOMwebClient

    if not remote.dicomweb_url:
        raise PacsConfigError("[pacs] dicomweb_url is not set")
    session = requests.Session()
    if remote.ca_file:
        session.verify = remote.ca_file
    if remote.auth == Auth.BASIC:
        session.auth = (remote.username, remote.secret)
    elif remote.auth == Auth.BEARER:
        session.headers["Authorization"] = f"Bearer {remote.secret}"
    return DICOMwebClient(url=remote.dicomweb_url, session=session)
