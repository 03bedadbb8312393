"""One TOML file for the PACS endpoints (``cxr-deploy pacs … --config pacs.toml``).

::

    [local]                      # this tool as a DICOM node
    ae_title = "CXRDEPLOY"
    spool = "/var/spool/cxr-deploy"   # pulled / received instances

    [listen]                     # pacs listen: the C-STORE SCP
    port = 11112
    bind = "127.0.0.1"           # or "0.0.0.0" behind the hospital firewall
    allowed_ae_titles = ["ORTHANC", "CT01"]   # required: nobody else may associate
    allowed_addresses = []       # optional: also restrict by IP address or network ("10.1.0.0/16")
    max_instance_mb = 200
    max_spool_gb = 50
    max_associations = 10        # associations at once; more are refused (logged with AE and address)
    keep_days = 0                # delete sent instances received longer ago than this (0: no age limit)
    spool_target_gb = 45         # delete sent instances, oldest first, down to this (default: 90 % of max)
    association_timeout = 5      # s to finish the TLS handshake and send A-ASSOCIATE-RQ, or dropped
    idle_timeout = 30            # s an established association may stay silent, then aborted
    tls_cert = ""                # DICOM TLS: PEM certificate chain and key (both, or neither)
    tls_key = ""
    metrics_port = 0             # Prometheus /metrics and /health on this port; 0 = off
    metrics_bind = "127.0.0.1"

    [pacs]                       # the remote PACS
    ae_title = "ORTHANC"         # DIMSE (C-STORE)
    host = "127.0.0.1"
    port = 4242
    dicomweb_url = "https://pacs.example.org/dicom-web"   # QIDO-RS, WADO-RS, STOW-RS
    push = "stow"                # or "cstore"
    auth = "basic"               # "none" | "basic" | "bearer"
    username = "cxr"
    password_env = "CXR_PACS_PASSWORD"   # or password_file = "/etc/cxr-deploy/pacs.secret"
    ca_file = "/etc/ssl/certs/pacs-ca.pem" # optional, for https (and DICOM TLS with tls = true)
    tls = false                  # DICOM TLS for C-STORE

    [run]                        # how pacs listen scores (its flags win over these; see run_settings)
    operating_point = "sens95"   # or threshold = 0.42; default: the bundle's threshold
    backend = "onnx"             # device = "auto"; modality = ["OT"]; body_part = []; accept_any_view,
                                 # dicom_filter: as batch's --modality, --body-part, ... flags

Secrets come only from an environment variable or a file named here, never from the command line,
the config itself or the URL (``https://user:secret@host/`` is refused), and are never logged or
printed (``repr`` hides them). A secret file that group or others can read gets a warning; a secret
with ``auth = "none"`` is an error (it would silently not be sent).
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ..errors import CxrDeployError
from ..run_settings import RunSettings, RunSettingsError, from_table

_AE = re.compile(r"^[ -~]{1,16}$")


class PacsConfigError(CxrDeployError):
    pass


class PushMethod(str, Enum):
    """How results go to the PACS."""

    STOW = "stow"
    """DICOMweb STOW-RS (``dicomweb_url``)."""
    CSTORE = "cstore"
    """DIMSE C-STORE (``ae_title``, ``host``, ``port``)."""


class Auth(str, Enum):
    """HTTP authentication for DICOMweb."""

    NONE = "none"
    """No credentials."""
    BASIC = "basic"
    """User name + password (``password_env`` or ``password_file``)."""
    BEARER = "bearer"
    """A token (``token_env`` or ``token_file``)."""


@dataclass(frozen=True)
class Remote:
    ae_title: str = "ORTHANC"
    host: str = "127.0.0.1"
    port: int = 4242
    dicomweb_url: str = ""
    push: PushMethod = PushMethod.STOW
    auth: Auth = Auth.NONE
    username: str = ""
    secret: str = field(default="", repr=False)  # password or token, from the environment or a file
    ca_file: str = ""
    tls: bool = False


@dataclass(frozen=True)
class Local:
    ae_title: str = "CXRDEPLOY"
    spool: str = "cxr-deploy-spool"


@dataclass(frozen=True)
class ListenSettings:
    ae_title: str
    port: int
    bind: str = "127.0.0.1"
    allowed_ae_titles: tuple[str, ...] = ()
    allowed_addresses: tuple[str, ...] = ()
    max_instance_bytes: int = 200 * 2**20
    max_spool_bytes: int = 50 * 2**30
    # pynetdicom's own default; instances stream to disk, so ten at once cost disk, not memory
    max_associations: int = 10
    # seconds a connection has to finish its TLS handshake and send its A-ASSOCIATE-RQ (a probe,
    # a scanner or a half-open socket is dropped after this, and never counts against the limit)
    association_timeout: float = 5.0
    # seconds an established association may stay silent (Orthanc's DicomScpTimeout is 30)
    idle_timeout: float = 30.0
    tls_cert: str = ""  # DICOM TLS for the SCP: certificate chain (PEM) ...
    tls_key: str = ""  # ... and its private key; both or neither
    # retention (cxr_deploy.pacs.retention): only instances whose results were sent are deleted
    keep_days: float = 0.0  # older ones go; 0: no age limit
    spool_target_bytes: int | None = None  # pruned down to this, oldest first; None: 90 % of the cap
    metrics_port: int = 0  # Prometheus /metrics and /health (cxr_deploy.pacs.metrics); 0 = off
    metrics_bind: str = "127.0.0.1"

    def address_allowed(self, address: str) -> bool:
        """Whether a peer at ``address`` may associate: no ``allowed_addresses`` allows all; else
        the address must be one of them or inside one of their networks (``10.1.0.0/16``). An
        IPv4 peer seen through an IPv6 socket (``::ffff:10.1.2.3``) is matched as IPv4."""
        if not self.allowed_addresses:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        ip = getattr(ip, "ipv4_mapped", None) or ip
        return any(ip in ipaddress.ip_network(entry) for entry in self.allowed_addresses)


@dataclass(frozen=True)
class PacsConfig:
    local: Local
    pacs: Remote
    listen: ListenSettings
    run: RunSettings = field(default_factory=RunSettings)  # the [run] table: a layer of run settings


SECRET_KEYS = ("password", "password_env", "password_file", "token", "token_env", "token_file")


def _secret(table: dict, kind: str, where: str) -> str:
    env, file = table.get(f"{kind}_env"), table.get(f"{kind}_file")
    if kind in table:
        raise PacsConfigError(f"{where}: put the {kind} in an environment variable ({kind}_env) or a file "
                              f"({kind}_file), never in the config itself")
    if env:
        value = os.environ.get(str(env))
        if value is None:
            raise PacsConfigError(f"{where}: environment variable {env} ({kind}) is not set")
        return value
    if file:
        try:
            value = Path(file).read_text().strip()
            mode = Path(file).stat().st_mode
        except OSError as exc:
            raise PacsConfigError(f"{where}: cannot read {kind}_file {file}: {exc.strerror or exc}") from None
        if mode & 0o077:
            print(f"cxr-deploy: warning: {kind}_file {file} can be read by group or others "
                  f"(mode {mode & 0o777:o}): chmod 600 it", file=sys.stderr)
        return value
    return ""


def _dicomweb_url(value, where: str) -> str:
    """The DICOMweb base URL: http(s), and never with credentials in it (they would be printed in
    every ``push to …`` line and log; they belong in ``username`` + ``password_env``/``_file``)."""
    from urllib.parse import urlsplit

    url = str(value or "").strip().rstrip("/")
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        has_userinfo = parts.username is not None or parts.password is not None
    except ValueError as exc:
        raise PacsConfigError(f"{where}: dicomweb_url is not a URL ({exc})") from None
    if has_userinfo:
        raise PacsConfigError(f"{where}: dicomweb_url carries credentials (user:…@host): put the user in "
                              f"username and the secret in password_env or password_file, never in the URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsConfigError(f"{where}: dicomweb_url must be an http:// or https:// URL")
    return url


def _ae(value, where: str) -> str:
    value = str(value).strip()
    if not _AE.match(value) or "\\" in value:
        raise PacsConfigError(f"{where}: AE title {value!r} must be 1-16 printable characters")
    return value


def load_pacs_config(path: str | Path) -> PacsConfig:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise PacsConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PacsConfigError(f"{path}: not valid TOML ({exc})") from None
    local_t, pacs_t = data.get("local", {}), data.get("pacs", {})
    try:
        auth = Auth(pacs_t.get("auth", "none"))
        push = PushMethod(pacs_t.get("push", "stow"))
    except ValueError as exc:
        raise PacsConfigError(f"{path}: {exc}") from None
    kind = {Auth.BASIC: "password", Auth.BEARER: "token"}.get(auth)
    stray = [key for key in SECRET_KEYS if key in pacs_t and not (kind and key.startswith(kind))]
    if stray:
        raise PacsConfigError(f"{path} [pacs]: {', '.join(stray)} given with auth = \"{auth.value}\": it would never be "
                              f"sent; set auth = \"basic\" (password) or \"bearer\" (token), or remove it")
    remote = Remote(ae_title=_ae(pacs_t.get("ae_title", "ORTHANC"), f"{path} [pacs]"),
                    host=str(pacs_t.get("host", "127.0.0.1")), port=int(pacs_t.get("port", 4242)),
                    dicomweb_url=_dicomweb_url(pacs_t.get("dicomweb_url", ""), f"{path} [pacs]"), push=push, auth=auth,
                    username=str(pacs_t.get("username", "")),
                    secret=_secret(pacs_t, kind, f"{path} [pacs]") if kind else "",
                    ca_file=str(pacs_t.get("ca_file", "")), tls=bool(pacs_t.get("tls", False)))
    if push == PushMethod.STOW and not remote.dicomweb_url:
        raise PacsConfigError(f"{path} [pacs]: push = \"stow\" needs dicomweb_url")
    local = Local(ae_title=_ae(local_t.get("ae_title", "CXRDEPLOY"), f"{path} [local]"),
                  spool=str(local_t.get("spool", "cxr-deploy-spool")))
    try:
        run = from_table(data.get("run", {}), f"{path} [run]")
    except RunSettingsError as exc:
        raise PacsConfigError(str(exc)) from None
    return PacsConfig(local, remote, _listen(data.get("listen", {}), local, f"{path} [listen]"), run)


def _listen(table: dict, local: Local, where: str) -> ListenSettings:
    allowed = tuple(_ae(a, where) for a in table.get("allowed_ae_titles", []))
    return ListenSettings(ae_title=local.ae_title, port=int(table.get("port", 11112)),
                          bind=str(table.get("bind", "127.0.0.1")), allowed_ae_titles=allowed,
                          allowed_addresses=_networks(table.get("allowed_addresses", []), where),
                          max_instance_bytes=int(float(table.get("max_instance_mb", 200)) * 2**20),
                          max_spool_bytes=int(float(table.get("max_spool_gb", 50)) * 2**30),
                          max_associations=_positive(table, "max_associations", 10, where, int),
                          association_timeout=_positive(table, "association_timeout", 5.0, where, float),
                          idle_timeout=_positive(table, "idle_timeout", 30.0, where, float),
                          tls_cert=str(table.get("tls_cert", "")), tls_key=str(table.get("tls_key", "")),
                          metrics_port=_port(table, "metrics_port", 0, where),
                          metrics_bind=str(table.get("metrics_bind", "127.0.0.1")),
                          **_retention(table, where))


def _retention(table: dict, where: str) -> dict:
    """``keep_days`` (0 or more) and ``spool_target_gb`` (more than 0, at most ``max_spool_gb``)."""
    out = {}
    if "keep_days" in table:
        try:
            out["keep_days"] = float(table["keep_days"])
        except (TypeError, ValueError):
            out["keep_days"] = -1.0
        if out["keep_days"] < 0:
            raise PacsConfigError(f"{where}: keep_days must be 0 (no age limit) or more, not {table['keep_days']!r}")
    if "spool_target_gb" in table:
        target = _positive(table, "spool_target_gb", 1, where, float)
        if target > float(table.get("max_spool_gb", 50)):
            raise PacsConfigError(f"{where}: spool_target_gb ({target:g}) is over max_spool_gb: the spool would "
                                  "fill up before retention starts")
        out["spool_target_bytes"] = int(target * 2**30)
    return out


def _networks(entries, where: str) -> tuple[str, ...]:
    """``allowed_addresses``: IP addresses or networks (CIDR), checked now so that a typo is a
    one-line config error, not a listener that refuses every sender."""
    if isinstance(entries, str) or not isinstance(entries, list):
        raise PacsConfigError(f"{where}: allowed_addresses must be a list, e.g. [\"10.1.0.0/16\", \"192.0.2.7\"]")
    networks = []
    for entry in entries:
        try:
            networks.append(str(ipaddress.ip_network(str(entry).strip())))
        except ValueError as exc:
            hint = " (host bits set: give the network address)" if "host bits set" in str(exc) else ""
            raise PacsConfigError(f"{where}: allowed_addresses entry {str(entry)[:60]!r} is not an IP address "
                                  f"or network (CIDR, e.g. 10.1.0.0/16){hint}") from None
    return tuple(networks)


def _port(table: dict, key: str, default: int, where: str) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise PacsConfigError(f"{where}: {key} must be a port number (0-65535; 0 = off), not {value!r}")
    return value


def _positive(table: dict, key: str, default, where: str, kind):
    try:
        value = kind(table.get(key, default))
    except (TypeError, ValueError):
        value = 0
    if value <= 0:
        raise PacsConfigError(f"{where}: {key} must be a positive number, not {table.get(key)!r}")
    return value
