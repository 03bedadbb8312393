"""Keep upstream deprecation notices about TorchScript / the legacy ONNX exporter off the terminal.

torch 2.14 warns on every ``torch.jit.trace``/``save``/``load`` ("deprecated, switch to
torch.export") and on the legacy TorchScript-based ONNX exporter. The user asked for these
formats on purpose, and the notices are addressed to library authors, not to whoever runs
``cxr-deploy export`` at 3 a.m. We silence exactly those messages, only inside our own export and
load calls; every other warning (including other deprecations) still reaches the terminal.
"""

from __future__ import annotations

import contextlib
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
