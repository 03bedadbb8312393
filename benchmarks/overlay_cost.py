"""What one Grad-CAM overlay costs, step by step, in one process on one core (as a decode worker).

A 1024² and a 2048² chest-like image (benchmarks/batch_throughput.py's generator), a 7x7 CAM at
input size 224; median ms per overlay over ``--repeat`` runs of each step:

- view: ``view_image`` (the original → 512² uint8, made by the worker while decoding);
- cam_to_image: the CAM grid resampled onto the view through the spec's geometry;
- colour+composite: palette, mask and ``Image.composite``;
- font: the font object for the overlay's size; text: caption + footer drawn on the film;
- colour bar: the strip on the right with its labels;
- render: ``render_overlay`` as a whole (colour+composite, font, text, colour bar);
- PNG encode (level 1) and JPEG encode (quality 90) into memory;
- save: ``save_overlay`` to a file (encode, temp file, link into place), PNG and JPEG;
- transfer: pickle dumps + loads of the view and the CAM (worker → main → worker).

Each overlay gets a new caption (its probability), as in a run. To compare with an older checkout of
the package: ``cd /tmp && PYTHONPATH=/path/to/old python /path/to/benchmarks/overlay_cost.py``
(outside the repository, so the old ``cxr_deploy`` is the one imported).

Usage::

    python benchmarks/overlay_cost.py [--repeat 30]
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_throughput import chest_like  # noqa: E402 (the realistic generator)

from cxr_deploy.batch import overlay as ov  # noqa: E402
from cxr_deploy.preprocessing import PreprocessSpec  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    fn()  # warm: first-use costs (imports, caches) are not per-overlay costs
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def steps(size: int, repeat: int, folder: Path) -> dict[str, float]:
    from PIL import Image

    spec = PreprocessSpec(input_size=224)
    pixels = chest_like(size, 0)
    view = ov.view_image(pixels)
    cam = np.random.default_rng(0).random((7, 7)).astype(np.float32)
    # A new probability on every overlay, as in a run: captions are not all the same text.
    probabilities = iter(np.linspace(0.5, 1.0, 100 * repeat))
    caption = ov.decision_caption("PNEUMONIA", 0.73, 0.5, "PNEUMONIA")

    def new_caption():
        return ov.decision_caption("PNEUMONIA", next(probabilities), 0.5, "PNEUMONIA")
    footer = "INT8 heat map, agreement with the fp32 map not measured."
    image, _ = ov.render_overlay(view, cam, spec, pixels.shape, caption, footer, weight=0.73)
    film = Image.fromarray(view, "L").convert("RGB")
    font, pad = ov._font(film)
    level = np.round(ov.cam_to_image(cam, spec, pixels.shape, view.shape) * 0.73 * 255).astype(np.uint8)

    def colour_composite():
        coloured = Image.fromarray(level, "P")
        coloured.putpalette(ov._PALETTE)
        mask = Image.fromarray(np.round(level * ov.ALPHA).astype(np.uint8), "L")
        Image.composite(coloured.convert("RGB"), Image.fromarray(view, "L").convert("RGB"), mask)

    def encode(fmt, **kw):
        image.save(io.BytesIO(), format=fmt, **kw)

    n = [0]

    def save(suffix):
        n[0] += 1
        ov.save_overlay(image, [folder / f"o{n[0]}{suffix}"], "id", caption)

    return {
        "view (worker, while decoding)": median_ms(lambda: ov.view_image(pixels), repeat),
        "cam_to_image": median_ms(lambda: ov.cam_to_image(cam, spec, pixels.shape, view.shape), repeat),
        "colour + composite": median_ms(colour_composite, repeat),
        "font": median_ms(lambda: ov._font(film), repeat),
        "text (caption + footer)": median_ms(lambda: ov._draw_text(film.copy(), new_caption(), footer, font, pad),
                                             repeat),
        "colour bar": median_ms(lambda: ov._with_colour_bar(film, font, pad), repeat),
        "render_overlay (all of the above but view)": median_ms(
            lambda: ov.render_overlay(view, cam, spec, pixels.shape, new_caption(), footer, weight=0.73), repeat),
        "PNG encode, level 1": median_ms(lambda: encode("PNG", compress_level=1), repeat),
        "JPEG encode, quality 90": median_ms(lambda: encode("JPEG", quality=90, subsampling=0), repeat),
        "save_overlay PNG (file)": median_ms(lambda: save(".png"), repeat),
        "save_overlay JPEG (file)": median_ms(lambda: save(".jpg"), repeat),
        "transfer (pickle view + cam)": median_ms(lambda: pickle.loads(pickle.dumps((view, cam))), repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {size: steps(size, args.repeat, Path(tmp)) for size in (1024, 2048)}
    print(f"median ms per overlay (one process), {args.repeat} runs each")
    print(f"{'step':45s} {'1024²':>8s} {'2048²':>8s}")
    for name in results[1024]:
        print(f"{name:45s} {results[1024][name]:8.2f} {results[2048][name]:8.2f}")


if __name__ == "__main__":
    main()
