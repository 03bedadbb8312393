"""How ``pacs pull`` and ``pacs push`` treat the network: timeouts, which failures are retried, the
back-off budget, and URLs as they may be printed.

- **Timeouts**: opening a connection (TCP connect, and for C-STORE the A-ASSOCIATE answer) gives up
  after :data:`CONNECT_TIMEOUT` s; an answer to a request after :data:`READ_TIMEOUT` s. Before, a
  PACS that was down kept ``push`` silent for 124 s per file: 4 tries of dicomweb-client's own 5
  (2 to 16 s apart, 30 s; now off, see :mod:`.dicomweb`), or of pynetdicom's 30 s ACSE timeout.
- **Transient** failures (no connection, a timeout, HTTP 5xx, 408 or 429, a C-STORE without an
  answer, an association rejected as transient) are retried with back-off (:data:`RETRY_DELAYS`)
  while the next try can still finish within :data:`RETRY_BUDGET` s of the first; a PACS that is
  down (no connection, no answer, a gateway's 502/503/504) is reported within those 10 s, and
  ``push`` stops there (an instance the PACS fails on, HTTP 500, fails alone: it must not block
  every push after it).
- **Permanent** failures (a C-STORE refusal status such as 0xA7xx, 0xA9xx or 0xCxxx, HTTP 4xx, a
  file that cannot be encoded) fail at once: the same request would be refused again.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from ..errors import CxrDeployError

CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 60.0
RETRY_DELAYS = (0.5, 1.0, 2.0)
RETRY_BUDGET = 10.0


class TransferError(CxrDeployError):
    pass


class Refused(TransferError):
    """The PACS answered and said no: retrying sends the same request to the same answer."""


class Unreachable(TransferError):
    """No answer from the PACS (no connection, no A-ASSOCIATE answer, a timeout): worth a retry."""


class AssociationRefused(Refused):
    """The PACS rejected the association itself (e.g. our AE title): every instance would be refused."""


def is_down(exc: BaseException) -> bool:
    """``exc`` says the PACS itself is not there (no connection, no answer, a gateway's 502/503/504),
    not that it failed on this one request (500): once the budget is spent on it, no other
    instance would get through either."""
    import requests

    if isinstance(exc, (Unreachable, requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return not isinstance(exc, Refused)
    return _status(exc) in (502, 503, 504)


def is_transient(exc: BaseException) -> bool:
    """Worth a retry: the PACS is not there (:func:`is_down`), or failed on the request (5xx),
    timed out on it (408) or asks to slow down (429). Anything else (a refusal, a malformed file,
    a bug) would fail the same way again."""
    status = _status(exc)
    return is_down(exc) or (status is not None and (status >= 500 or status in (408, 429)))


def _status(exc: BaseException) -> int | None:
    import requests

    response = getattr(exc, "response", None)
    return response.status_code if isinstance(exc, requests.HTTPError) and response is not None else None


def reason(exc: BaseException) -> str:
    """One line for ``exc``: the HTTP status, or the innermost OS error, never a wall of URL text."""
    import requests

    response = getattr(exc, "response", None)
    if isinstance(exc, requests.HTTPError) and response is not None:
        return f"HTTP {response.status_code} {response.reason or ''}".strip()
    text = " ".join(str(exc).split())
    if isinstance(exc, TransferError):
        return redact_url(text)  # ours: already one line that says what happened
    if isinstance(exc, requests.Timeout):
        return f"no answer within {CONNECT_TIMEOUT:g} s (connect) or {READ_TIMEOUT:g} s (read)"
    if isinstance(exc, requests.ConnectionError):
        errno = re.findall(r"\[Errno -?\d+\] [^'\")]+", text)
        return errno[-1].strip() if errno else "connection failed"
    return redact_url(f"{type(exc).__name__}: {text}")[:200]


@dataclass
class Outcome:
    error: str = ""  # "" on success
    down: bool = False  # the budget was spent on the PACS not being there (see is_down)
    exception: BaseException | None = None


def with_retries(action, delays=RETRY_DELAYS, budget: float = RETRY_BUDGET, try_time: float = CONNECT_TIMEOUT,
                 note=None) -> Outcome:
    """Run ``action`` until it succeeds, a permanent failure, or the back-off budget is spent: a retry
    is made only if it can start and connect (``try_time``) within ``budget`` s of the first try.
    ``note(message)`` hears about each retry (the progress a user sees while the PACS is down)."""
    start, tries, last, error = time.monotonic(), 0, "", None
    for delay in (0.0, *delays):
        if tries and time.monotonic() - start + delay + try_time > budget:
            break
        if delay:
            if note:
                note(f"{last}; retry in {delay:g} s")
            time.sleep(delay)
        tries += 1
        try:
            action()
            return Outcome()
        except Exception as exc:  # noqa: BLE001 - classified below: retried, or reported at once
            last, error = reason(exc), exc
            if not is_transient(exc):
                answer = "refused; " if isinstance(exc, Refused) or _status(exc) else ""
                return Outcome(f"{last} ({answer}not retried)", False, exc)
    return Outcome(f"{last} (after {tries} tries in {time.monotonic() - start:.1f} s)", is_down(error), error)


def redact_url(text: str) -> str:
    """``text`` (a URL, or a message quoting URLs: requests and urllib3 put whole URLs in theirs)
    with the user info of every ``scheme://user:secret@host`` replaced: ``scheme://***@host``.
    Every URL this package prints goes through here (the config refuses user info in
    ``dicomweb_url``; this keeps a secret out of the logs whatever the route)."""
    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@", r"\1***@", str(text))
