"""``cxr-deploy sweep``: a grid of short training runs, ranked by validation AUC.

Layout of the sweep directory::

    trials/<trial-id>/        a normal training run directory (config, metrics, best/ bundle)
    trials/<trial-id>/result.json   written when the trial has finished: it marks the trial done
    results.csv               every finished trial, best first (val AUC, then val loss)
    best_config.toml          the base config with the best trial's values: `cxr-deploy train --config`

Re-running the same command skips trials with a result.json, resumes trials that were interrupted
(they have last.pt but no result.json) and runs the rest. Every trial uses the same seed and the
same train/validation split (carved once from the same data with the same seed), so differences
come from the grid, not from the split.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import time
from pathlib import Path

from cxr_deploy import atomic

from .config import TrainConfig
from .engine import CHECKPOINT_NAME, SUMMARY_NAME, log, resume, train

GRID_KEYS = ("optimizer", "lr", "weight_decay", "batch_size")
RESULT_NAME = "result.json"
RESULTS_CSV = "results.csv"
BEST_CONFIG = "best_config.toml"


def expand_grid(grid: dict[str, list]) -> list[dict]:
    """Cartesian product in a fixed key order (GRID_KEYS first), so trial order is reproducible."""
    unknown = set(grid) - set(TrainConfig.__dataclass_fields__) - {"augment"}
    if unknown:
        raise ValueError(f"unknown sweep key(s): {sorted(unknown)}")
    keys = [k for k in GRID_KEYS if grid.get(k)] + sorted(k for k in grid if k not in GRID_KEYS and grid[k])
    for key in keys:
        if not isinstance(grid[key], (list, tuple)):
            grid[key] = [grid[key]]
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def trial_id(params: dict) -> str:
    """Readable and unique: e.g. ``adamw_lr0.001_wd0.0001_bs16-3f2a1c``."""
    short = {"optimizer": "", "lr": "lr", "weight_decay": "wd", "batch_size": "bs"}
    parts = [f"{short.get(k, k)}{v:g}" if isinstance(v, float) else f"{short.get(k, k)}{v}" for k, v in params.items()]
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
    name = "_".join(parts).replace("/", "-").replace(" ", "")
    return f"{name}-{digest}"


def sweep(base: TrainConfig, grid: dict[str, list], out: str | Path) -> list[dict]:
    """Run every grid point not already finished; return all results ranked best first."""
    out = Path(out)
    trials_dir = out / "trials"
    if out.is_dir() and any(out.iterdir()) and not trials_dir.is_dir():
        # results.csv and best_config.toml are (re)written here: never over a folder of someone else's
        raise ValueError(f"--out {out} is not empty and is not a sweep folder (no trials/); choose a new or empty folder")
    trials_dir.mkdir(parents=True, exist_ok=True)
    trials = expand_grid(dict(grid))
    if not trials:
        raise ValueError("empty sweep grid: give at least one of --optimizer/--lr/--weight-decay/--batch-size "
                         "with comma-separated values, or a [sweep] table in the config")
    log(f"sweep: {len(trials)} trial(s) into {out}")
    for n, params in enumerate(trials, start=1):
        run_dir = trials_dir / trial_id(params)
        result_file = run_dir / RESULT_NAME
        if result_file.is_file():
            log(f"[{n}/{len(trials)}] {run_dir.name}: finished earlier, skipped")
            continue
        t0 = time.perf_counter()
        try:
            if (run_dir / CHECKPOINT_NAME).is_file():
                log(f"[{n}/{len(trials)}] {run_dir.name}: resuming an interrupted trial")
                resume(run_dir, progress=base.progress)
            else:
                log(f"[{n}/{len(trials)}] {run_dir.name}: training")
                train(base.with_overrides(out=str(run_dir), **params))
            summary = json.loads((run_dir / SUMMARY_NAME).read_text())
            val = summary["val_metrics"]
            result = {"trial": run_dir.name, **params, "status": "ok", "val_auc": val.get("auc"),
                      "val_loss": val.get("loss"), "best_epoch": summary["best_epoch"],
                      "threshold": summary["threshold_rule"]["threshold"]}
        except (FloatingPointError, ValueError, RuntimeError) as exc:
            # A diverging LR is a result too (it ranks last); re-running does not retry it.
            result = {"trial": run_dir.name, **params, "status": f"failed: {type(exc).__name__}: {exc}",
                      "val_auc": None, "val_loss": None, "best_epoch": None, "threshold": None}
            log(f"[{n}/{len(trials)}] {run_dir.name}: {result['status']}")
        result["seconds"] = round(time.perf_counter() - t0, 1)
        result["run_dir"] = str(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(result_file, result)
    results = collect_results(out, [trial_id(p) for p in trials])
    write_results(out, results)
    best = next((r for r in results if r["status"] == "ok"), None)
    if best is not None:
        best_params = {k: best[k] for k in trials[0]}
        base.with_overrides(out="", **best_params).save(out / BEST_CONFIG)
        auc = "n/a" if best["val_auc"] is None else f"{best['val_auc']:.4f}"
        log(f"best trial: {best['trial']} (val AUC {auc}): {best_params}; config saved to {out / BEST_CONFIG}")
    return results


def _rank_key(row: dict):
    ok = row["status"] == "ok"
    auc = row.get("val_auc")
    auc = -1.0 if auc is None or (isinstance(auc, float) and math.isnan(auc)) else auc
    loss = row.get("val_loss")
    return (not ok, -auc, math.inf if loss is None else loss, row["trial"])


def collect_results(out: Path, trial_ids: list[str]) -> list[dict]:
    """Results of the given trials (this grid), best first."""
    rows = []
    for tid in trial_ids:
        file = Path(out) / "trials" / tid / RESULT_NAME
        if file.is_file():
            rows.append(json.loads(file.read_text()))
    rows.sort(key=_rank_key)
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def write_results(out: Path, rows: list[dict]) -> None:
    fields = ["rank", "trial"]
    for row in rows:
        fields += [k for k in row if k not in fields]
    with atomic.open_atomic(Path(out) / RESULTS_CSV, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _write_json(path: Path, data: dict) -> None:
    atomic.write_text(path, json.dumps(data, indent=2) + "\n")


def grid_from_config(data: dict) -> dict[str, list]:
    """The ``[sweep]`` table of a TOML config (lists of values per key)."""
    table = data.get("sweep") or {}
    if not isinstance(table, dict):
        raise ValueError("[sweep] must be a table of lists")
    return {k: (v if isinstance(v, list) else [v]) for k, v in table.items()}
