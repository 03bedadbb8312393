"""Keep library notices that are not the user's business off the terminal.

1. Upstream deprecation notices about TorchScript / the legacy ONNX exporter (:func:`quiet_export`).
2. pydicom/highdicom/pynetdicom ``UserWarning``s about the *data* (:func:`dicom_warnings_once`).

torch 2.14 warns on every ``torch.jit.trace``/``save``/``load`` ("deprecated, switch to
torch.export") and on the legacy TorchScript-based ONNX exporter. The user asked for these
formats on purpose, and the notices are addressed to library authors, not to whoever runs
``cxr-deploy export`` at 3 a.m. We silence exactly those messages, only inside our own export and
load calls; every other warning (including other deprecations) still reaches the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings

# (category, message regex) of the notices we knowingly accept.
ACCEPTED_NOTICES = (
    (FutureWarning, r"`torch\.jit\.\w+` is deprecated"),
    (DeprecationWarning, r"You are using the legacy TorchScript-based ONNX export"),
    (DeprecationWarning, r"The feature will be removed\. Please remove usage of this function"),
)


@contextlib.contextmanager
def quiet_export():
    with warnings.catch_warnings():
        for category, message in ACCEPTED_NOTICES:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


# -- DICOM library warnings --------------------------------------------------------------------------
# Real archives are full of values pydicom and highdicom find odd ("value length (56) exceeds the
# maximum length of 16 allowed for VR SH", "the string X is unlikely to represent the intended
# person name"): on the 267 test files, a batch with --dicom-out printed 51 warning lines, one or
# two per file, several of them quoting a patient's name. They say something about the data, not
# about the run, so each kind (library, category and the message with its quoted values removed)
# goes to the log once, and the rest are dropped.
DICOM_LIBRARIES = ("pydicom", "highdicom", "pynetdicom")
log = logging.getLogger("cxr_deploy.dicom")
_QUOTED = re.compile(r"""(["'])(?:(?!\1).)*\1""")
_seen: set[tuple] = set()
_previous_showwarning = None


def _library_of(filename: str) -> str | None:
    parts = os.path.normpath(filename).split(os.sep)
    return next((lib for lib in DICOM_LIBRARIES if lib in parts), None)


def redact(text: str) -> str:
    """A library's message with every quoted value (a name, an ID, a UID) replaced by ``"…"``."""
    return _QUOTED.sub('"…"', text)


def _show(message, category, filename, lineno, file=None, line=None):
    library = _library_of(filename)
    if library is None:
        return _previous_showwarning(message, category, filename, lineno, file, line)
    text = redact(str(message))
    kind = (library, category, text)  # the same words from two places (highdicom's SR and SC) are one kind
    if kind in _seen:
        return None
    _seen.add(kind)
    log.warning("DICOM data warning (%s %s, %s line %d; further ones of this kind are not shown): %s", library,
                category.__name__, os.path.basename(filename), lineno, text)
    return None


def dicom_warnings_once() -> None:
    """Route warnings raised inside the DICOM libraries to the ``cxr_deploy.dicom`` logger, once per
    kind, values redacted (the command and its worker processes call this; a library user's own
    program keeps its warnings as they are). Idempotent."""
    global _previous_showwarning
    if _previous_showwarning is None:
        _previous_showwarning = warnings.showwarning
        warnings.showwarning = _show
