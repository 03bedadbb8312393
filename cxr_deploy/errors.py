"""Typed errors with one-line reasons a PACS engineer can act on.

Every failure to read an input surfaces as :class:`UnreadableImage`; every problem with a saved
model surfaces as :class:`BundleError`. Callers (the batch runner, ``inspect``) rely on this: any
other exception escaping the reader is a bug.
"""

from __future__ import annotations

import sys

ERROR_PREFIX = "cxr-deploy: error:"


class CxrDeployError(Exception):
    """Base class for every error this package raises on purpose."""


class UnreadableImage(CxrDeployError):
    """An input file could not be turned into a pixel array.

    ``reason`` is one line, no traceback, suitable for a CSV cell or a log line.
    """

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # always one line
        super().__init__(f"{self.path}: {self.reason}")


class NotAnImage(UnreadableImage):
    """The file is not PNG, JPEG or DICOM (folder scans report these as skipped)."""


class NotEligible(UnreadableImage):
    """A readable image the model was not made for (not a frontal chest radiograph, see
    :mod:`cxr_deploy.eligibility`): reported as ``skipped`` with the reason, never scored.

    ``header`` holds the non-identifying values the decision used (modality, body part, view, UIDs)
    so a skipped row still says what the file was.
    """

    def __init__(self, path, reason: str, header: dict | None = None):
        super().__init__(path, reason)
        self.header = dict(header or {})


class BundleError(CxrDeployError):
    """A model bundle is missing, incomplete, tampered with or from an incompatible version."""


class WeightsUnavailable(CxrDeployError):
    """Pretrained weights were asked for but cannot be obtained (usually: offline)."""


class TorchMissing(CxrDeployError):
    """PyTorch is needed and this is an inference-only install (``pip install cxr-deploy``)."""


TRAIN_EXTRA = "install cxr-deploy[train] for the torch backends, training and export (pip install 'cxr-deploy[train]')"


def torch_is_missing(exc: ImportError) -> bool:
    """True when ``exc`` is PyTorch or torchvision not being installed (not a broken install)."""
    return isinstance(exc, ModuleNotFoundError) and (exc.name or "").partition(".")[0] in ("torch", "torchvision")


def require_torch(what: str):
    """``import torch`` for ``what`` (e.g. ``--backend torch``), or :class:`TorchMissing` in one line."""
    try:
        import torch
    except ImportError as exc:
        if not torch_is_missing(exc):
            raise
        raise TorchMissing(f"{what} needs PyTorch, which is not installed here: {TRAIN_EXTRA}") from None
    return torch


def fail(message: str, code: int = 2) -> None:
    """Every command's one-line error: ``cxr-deploy: error: <message>`` on stderr, then exit.

    Here, not in :mod:`cxr_deploy.cli`, so the sub-command CLIs (batch, evaluate, pacs) never import
    the command router that imports them."""
    import click  # only the commands call this: decode workers and the Python API never pay for click

    click.echo(f"{ERROR_PREFIX} {' '.join(str(message).split())}", err=True)
    sys.exit(code)
