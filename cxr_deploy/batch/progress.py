"""The batch progress bar: on a terminal only (cron logs get the end summary), with the total and
ETA once the inputs are counted."""

from __future__ import annotations

import sys

from .inputs import count_new_inputs


def show_total_when_counted(progress, config, done: dict[str, str]) -> None:
    """The bar shows how many inputs were processed at once; the total (and so the ETA) appears when
    a second, names-only scan in a daemon thread has counted them (the run itself scans lazily, so
    memory never grows with the number of inputs)."""
    import threading

    def count():
        try:
            total = count_new_inputs(config.inputs, config.shard, done)
        except Exception:  # noqa: BLE001 - a bar without a total; the run reports the real problem
            return
        progress.total = total
        progress.set_description("batch", refresh=True)

    progress.set_description("batch (counting inputs)", refresh=False)
    threading.Thread(target=count, name="cxr-deploy-count-inputs", daemon=True).start()


def progress_bar(enabled: bool, total: int | None = None):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in cron logs (the end summary is always printed).
    return tqdm(unit="img", desc="batch", file=sys.stderr, disable=None if enabled else True, total=total,
                dynamic_ncols=True, smoothing=0.1)
