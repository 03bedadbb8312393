"""``cxr-deploy inspect``: what the reader sees in each file, or what a bundle holds.

The tool a PACS engineer reaches for when one file misbehaves: one line per file with format,
size, photometric interpretation, bit depth, transfer syntax, how values were mapped to gray and
the decoded range — or the one-line reason it cannot be read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from . import atomic, in_population
from .errors import BundleError, NotAnImage, UnreadableImage
from .imaging import DEFAULT_MAX_PIXELS, read_image, scan_paths
from .preprocessing import PreprocessSpec


def describe(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, object]:
    """Return ("ok", DecodedImage) or ("error", reason) for one file."""
    try:
        return "ok", read_image(path, max_pixels=max_pixels)
    except NotAnImage as exc:
        return "skipped", exc.reason
    except UnreadableImage as exc:
        return "error", exc.reason


def format_line(path: str, status: str, result) -> str:
    if status != "ok":
        return f"{path}\t{status.upper()}\t{result}"
    meta, pixels = result.meta, result.pixels
    shape = "x".join(str(s) for s in meta.original_shape)
    parts = [path, meta.format, shape, meta.photometric or "-", f"{meta.bits_stored}bit" if meta.bits_stored else "-",
             meta.transfer_syntax or "-", meta.voi or "-", f"range=[{pixels.min():.3f},{pixels.max():.3f}]"]
    if meta.multi_frame:
        parts.append(f"frames={meta.frames}(read frame {meta.frame_index})")
    return "\t".join(parts)


def _png_name(path: str, root: str | None) -> str:
    rel = Path(path).relative_to(root) if root and Path(path).is_relative_to(root) else Path(path)
    return "__".join(p for p in rel.parts if p not in ("/", "..")) + ".png"


@click.command("inspect")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--png", "png_dir", type=click.Path(file_okay=False), help="Write what the model would see (after preprocessing) as PNGs here.")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), help="Bundle whose preprocessing spec --png uses (default: ImageNet spec at 224).")
@click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True, help="Refuse images larger than this (decompression-bomb guard).")
def inspect_command(paths, png_dir, model_dir, max_pixels):
    """Show what the reader sees in images/folders, or print a bundle's manifest.

    One line per file: path, format, stored size, photometric, bits, transfer syntax, VOI mapping,
    decoded value range — or ERROR/SKIPPED with the reason.
    """
    from .bundle import is_bundle

    spec = PreprocessSpec()
    if model_dir:
        from .bundle import ModelBundle

        spec = ModelBundle.load(model_dir, verify=False).spec
    counts = {"ok": 0, "error": 0, "skipped": 0}
    for item in paths:
        if is_bundle(item):
            _print_bundle(item)
            continue
        root = item if Path(item).is_dir() else None
        for entry in scan_paths([item]):
            if entry.skipped:
                counts["skipped"] += 1
                click.echo(f"{entry.path}\tSKIPPED\t{entry.skip_reason}")
                continue
            status, result = describe(entry.path, max_pixels=max_pixels)
            counts[status] += 1
            click.echo(format_line(entry.path, status, result))
            if png_dir and status == "ok":
                from PIL import Image

                out = Path(png_dir) / _png_name(entry.path, root)
                out.parent.mkdir(parents=True, exist_ok=True)
                seen = spec.resize_gray(result.pixels)
                with atomic.temp_for(out) as tmp:
                    Image.fromarray(np.round(seen * 255).astype(np.uint8)).save(tmp, format="PNG")
    if sum(counts.values()):
        click.echo(f"# {counts['ok']} readable, {counts['error']} unreadable, {counts['skipped']} skipped", err=True)


def _print_bundle(path: str) -> None:
    from .bundle import ModelBundle

    try:
        bundle = ModelBundle.load(path)
        status = "verified (all artifact hashes match)"
    except BundleError as exc:
        click.echo(f"{path}\tBUNDLE ERROR\t{exc}")
        return
    click.echo(f"# bundle {path}: {status}; model id {bundle.model_id}")
    from .decision import threshold_warning

    warnings = list((bundle.manifest.training or {}).get("warnings") or [])
    computed = threshold_warning(bundle.threshold)
    if computed and computed not in warnings:
        warnings.append(computed)
    for warning in warnings:
        click.echo(f"# WARNING: {warning}")
    _print_operating_points(bundle)
    for line in in_population.describe(bundle):
        click.echo(f"# {line}")
    json.dump(bundle.manifest.to_dict(), sys.stdout, indent=2)
    click.echo()


def _fmt3(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _print_operating_points(bundle) -> None:
    """Each named point with what it gave on validation, the bundle's default marked, and a note for
    every ``sensNN`` point less sensitive than the default: ``sensNN`` is the *highest* threshold that
    reaches NN% validation sensitivity, so a default (Youden's J) that already exceeds it is the more
    sensitive choice, whatever the names suggest."""
    from .decision import number_text

    points = (bundle.manifest.training or {}).get("operating_points") or {}
    if not points:
        return
    default = next((n for n, p in points.items() if p["threshold"] == bundle.threshold), None)
    click.echo(f"# operating points (chosen on validation; batch --operating-point NAME); default threshold "
               f"{number_text(bundle.threshold)}" + (f" = {default}" if default else " (not one of them)") + ":")
    width = max(map(len, points))
    for name, point in points.items():
        click.echo(f"#   {name:<{width}}  threshold {number_text(point['threshold'])}  validation sensitivity "
                   f"{_fmt3(point.get('sensitivity'))}, specificity {_fmt3(point.get('specificity'))}"
                   + ("  <- default" if name == default else ""))
    base = points.get(default) if default else None
    if not base or base.get("sensitivity") is None:
        return
    for name, point in points.items():
        if name.startswith("sens") and point.get("sensitivity") is not None \
                and point["sensitivity"] < base["sensitivity"]:
            click.echo(f"# note: {name} is less sensitive than the default {default} on validation "
                       f"({_fmt3(point['sensitivity'])} vs {_fmt3(base['sensitivity'])}; it is the highest "
                       f"threshold reaching its target): to miss fewer positives, keep the default")
