"""Overlays: the heatmap's hottest point lies on the lesion in the *original* image.

The CAM here is what a perfect lesion detector would output: it is computed from the actual model
input that the bundle's spec makes of the image (letterboxed or centre-cropped by
PreprocessSpec.resize_gray, not by the overlay code), pooled over the 32x32 cells the network's
CAM grid covers. So the test checks the overlay's geometry independently of how it is computed.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxr_deploy.batch.overlay import render_overlay, view_image, write_overlay
from cxr_deploy.preprocessing import PreprocessSpec


def _lesion_image(h, w, box):
    y0, y1, x0, x1 = box
    img = np.full((h, w), 0.3, np.float32)
    img[y0:y1, x0:x1] = 1.0
    return img


def _detector_cam(spec, pixels):
    gray = spec.resize_gray(pixels)  # what the model sees
    g = spec.input_size // 32
    lesion = (gray > 0.8).astype(np.float32)
    cam = lesion.reshape(g, 32, g, 32).mean(axis=(1, 3))
    return cam / cam.max()


@pytest.mark.parametrize("shape,box,resize", [
    ((400, 600), (250, 330, 420, 520), "letterbox"),   # wide film, lesion lower right
    ((600, 400), (60, 140, 40, 120), "letterbox"),     # tall film, lesion upper left
    ((400, 600), (150, 230, 300, 380), "center_crop"),
])
def test_hottest_overlay_region_is_on_the_lesion(shape, box, resize, tmp_path):
    spec = PreprocessSpec(input_size=224, resize=resize)
    pixels = _lesion_image(*shape, box)
    cam = _detector_cam(spec, pixels)
    view = view_image(pixels)
    assert max(view.shape) == 512

    image, heat = render_overlay(view, cam, spec, shape, caption="PNEUMONIA p=0.900")
    # the film at full view size, the colour bar in a strip to its right (never over the anatomy)
    assert image.height == view.shape[0] and image.width > view.shape[1]
    vy, vx = np.unravel_index(np.argmax(heat), heat.shape)
    # back to original coordinates (the view is a plain scaling of the original)
    oy, ox = (vy + 0.5) * shape[0] / view.shape[0], (vx + 0.5) * shape[1] / view.shape[1]
    y0, y1, x0, x1 = box
    assert y0 <= oy < y1 and x0 <= ox < x1, (oy, ox, box)
    # and the heat is concentrated there: hot area mostly inside the lesion box
    hot = heat > 0.5
    ys, xs = np.nonzero(hot)
    oys, oxs = (ys + 0.5) * shape[0] / view.shape[0], (xs + 0.5) * shape[1] / view.shape[1]
    cell = 32 * max(shape) / 224  # one CAM cell in original pixels: the map's resolution
    inside = (oys >= y0 - cell) & (oys < y1 + cell) & (oxs >= x0 - cell) & (oxs < x1 + cell)
    assert inside.mean() > 0.95

    out = write_overlay([tmp_path / "o.png"], "{}", view, cam, spec, shape, "PNEUMONIA p=0.900", "footer")
    written = np.asarray(Image.open(out).convert("RGB")).astype(int)[:, :view.shape[1]]
    # the PNG is colored where the heat is, plain gray (R=G=B) where there is none
    colorfulness = written.max(axis=2) - written.min(axis=2)
    band = max(20, view.shape[0] // 28 * 2)  # skip caption and footer bands
    body = slice(band, view.shape[0] - band)
    assert colorfulness[body][heat[body] == 0].max() == 0
    assert colorfulness[vy, vx] > 30

    jpeg = write_overlay([tmp_path / "o.jpg"], "{}", view, cam, spec, shape, "PNEUMONIA p=0.900", "footer")
    assert open(jpeg, "rb").read(3) == b"\xff\xd8\xff"  # a real JPEG, not a PNG with another name
    lossy = np.asarray(Image.open(jpeg).convert("RGB")).astype(int)[:, :view.shape[1]]
    assert np.abs(lossy - written).mean() < 3  # quality 90: close to the lossless overlay
    lossy_color = lossy.max(axis=2) - lossy.min(axis=2)
    assert lossy_color[vy, vx] > 30 and np.median(lossy_color[body][heat[body] == 0]) <= 2


@pytest.mark.parametrize("cam_format, cam_for, signature", [("png", "all", b"\x89PNG"),
                                                            ("jpeg", "positive", b"\xff\xd8\xff")])
def test_batch_writes_one_overlay_per_selected_row(tiny_bundle, png_folder, tmp_path, cam_format, cam_for, signature):
    from click.testing import CliRunner

    from cxr_deploy.batch.cli import batch_command
    from cxr_deploy.batch.results_file import read_results

    out, cams = tmp_path / "results.csv", tmp_path / "cams"
    args = [str(png_folder), "--model", str(tiny_bundle), "--out", str(out), "-j", "1"]
    assert CliRunner().invoke(batch_command, args).exit_code == 0
    # A threshold between the images' probabilities, so some rows are positive and some are not.
    threshold = float(np.median([float(r["probability"]) for r in read_results(out)]))
    result = CliRunner().invoke(batch_command, [*args, "--overwrite", "--cam-dir", str(cams), "--cam-format",
                                                cam_format, "--cam-for", cam_for, "--threshold", f"{threshold:.6f}"])
    assert result.exit_code == 0, result.output
    rows = read_results(out)
    wanted = [r for r in rows if cam_for == "all" or r["predicted_label"] == "PNEUMONIA"]
    assert 0 < len(wanted) and (cam_for == "all") == (len(wanted) == len(rows))
    suffix = {"png": ".png", "jpeg": ".jpg"}[cam_format]
    for row in rows:
        if row in wanted:
            assert row["overlay_path"].endswith(suffix)
            assert open(row["overlay_path"], "rb").read(len(signature)) == signature
        else:
            assert row["overlay_path"] == ""
    assert len(list(cams.iterdir())) == len(wanted)  # no temp files left behind


def test_caption_prints_probability_and_threshold_with_the_same_sufficient_precision():
    import re

    from cxr_deploy.batch.overlay import decision_caption

    # The reported case: p=0.5471 >= threshold 0.547077 was shown as "p=0.547 threshold 0.55".
    for p, t in [(0.5471, 0.547077), (0.547077, 0.547077), (0.91, 0.2), (0.54701, 0.547009)]:
        caption = decision_caption("PNEUMONIA" if p >= t else "NORMAL", p, t, "PNEUMONIA")
        shown_p, shown_t = re.search(r"p\(PNEUMONIA\)=([0-9.]+)\s+threshold ([0-9.]+)", caption).groups()
        assert len(shown_p.split(".")[1]) == len(shown_t.split(".")[1]) >= 3, caption
        if p != t:
            assert shown_p != shown_t, caption  # never "p=0.547 threshold 0.547" for different numbers
        assert (float(shown_p) >= float(shown_t)) == (p >= t), caption


def test_heat_is_comparable_between_images():
    """Each CAM is max-normalized per image; weighted by p(positive), a confident NORMAL stays gray."""
    spec = PreprocessSpec(input_size=224)
    pixels = _lesion_image(400, 400, (100, 200, 100, 200))
    cam = _detector_cam(spec, pixels)
    view = view_image(pixels)
    colorful = {}
    for p in (0.95, 0.05):
        image, heat = render_overlay(view, cam, spec, pixels.shape, weight=p)
        assert heat.max() == pytest.approx(p, abs=0.01)
        body = np.asarray(image.convert("RGB")).astype(int)[:, :view.shape[1]]
        colorful[p] = (body.max(axis=2) - body.min(axis=2))[60:-60].max()
    assert colorful[0.95] > 100 and colorful[0.05] < 20, colorful


def test_colour_bar_says_what_red_means_and_footer_wraps_on_square_and_portrait_films():
    from PIL import ImageDraw

    from cxr_deploy.batch.overlay import _font, _wrap

    spec = PreprocessSpec(input_size=224)
    footer = ("cxr-deploy model 0123456789abcdef. Decision support only, not a diagnosis. "
              "Heat = class activation map x p(PNEUMONIA).")
    for shape in ((400, 400), (600, 300)):  # square, portrait: where the footer was cut off
        pixels = _lesion_image(*shape, (50, 100, 50, 100))
        view = view_image(pixels)
        image, _ = render_overlay(view, _detector_cam(spec, pixels), spec, shape, "NORMAL", footer, weight=1.0)
        rgb = np.asarray(image.convert("RGB")).astype(int)
        strip = rgb[:, view.shape[1]:]
        red = (strip[..., 0] > 200) & (strip[..., 2] < 60)
        blue = (strip[..., 2] > 150) & (strip[..., 0] < 60)
        assert red.any() and blue.any()
        assert np.nonzero(red)[0].mean() < np.nonzero(blue)[0].mean()  # red at the top: 1, blue at 0
        font, pad = _font(image)
        lines = _wrap(ImageDraw.Draw(image), footer, font, image.width - 2 * pad)
        assert len(lines) >= 2 and " ".join(lines) == footer
        assert all(ImageDraw.Draw(image).textlength(line, font=font) <= image.width - 2 * pad for line in lines)


def test_cached_fonts_and_colour_bar_draw_exactly_what_pillow_draws_uncached():
    """The overlay's text rendering is memoized per font and its colour bar drawn once per size: the
    pixels equal a reference drawn with Pillow's own (uncached) font and the bar drawn in place,
    on the first (cold) and the later (warm) overlays."""
    from PIL import ImageFont

    from cxr_deploy.batch import overlay as ov

    spec = PreprocessSpec(input_size=224)
    caption, footer = "PNEUMONIA  p(PNEUMONIA)=0.731  threshold 0.500", "INT8 heat map, agreement with fp32 not measured."
    for shape in ((400, 600), (600, 300)):
        pixels = _lesion_image(*shape, (50, 100, 50, 100))
        view, cam = view_image(pixels), _detector_cam(spec, pixels)
        ov.load_font.cache_clear()
        ov._colour_bar_strip.cache_clear()
        cold, _ = render_overlay(view, cam, spec, shape, caption, footer, weight=0.73)
        warm, _ = render_overlay(view, cam, spec, shape, caption, footer, weight=0.73)

        bare, _ = render_overlay(view, cam, spec, shape, "", "", weight=0.73)  # no text is drawn on the film
        film = bare.crop((0, 0, view.shape[1], view.shape[0]))
        cached_font, pad = ov._font(film)
        font = ImageFont.load_default(size=cached_font.size)  # Pillow's, nothing memoized
        ov._draw_text(film, caption, footer, font, pad)
        reference = Image.new("RGB", cold.size, (0, 0, 0))
        reference.paste(film, (0, 0))
        ov.draw_colour_bar(reference, film.width, font, pad)
        assert np.array_equal(np.asarray(cold), np.asarray(reference))
        assert np.array_equal(np.asarray(warm), np.asarray(reference))


@pytest.mark.parametrize("deflater", ["isal", "zlib"])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_overlay_png_reads_back_as_exactly_the_rendered_pixels_with_its_texts(tmp_path, mode, deflater, monkeypatch):
    from PIL.PngImagePlugin import PngInfo

    from cxr_deploy.batch import png
    from cxr_deploy.batch.overlay import IDENTITY_KEY, read_identity, save_overlay
    from cxr_deploy.batch.png import write_png

    if deflater == "zlib":  # where isal has no wheel
        monkeypatch.setattr(png, "_isal", None)
    else:
        assert png._isal is not None, "isal is a dependency on this platform"

    spec = PreprocessSpec(input_size=224)
    pixels = _lesion_image(300, 500, (50, 100, 50, 100))
    image, _ = render_overlay(view_image(pixels), _detector_cam(spec, pixels), spec, (300, 500), "NORMAL ü", weight=0.9)
    image = image.convert(mode)
    if mode == "RGB":
        path = save_overlay(image, [tmp_path / "o.png"], '{"path": "x"}', "NORMAL ü\nfooter")
    else:
        path = tmp_path / f"o_{mode}.png"
        info = PngInfo()
        info.add_text(IDENTITY_KEY, "id")
        write_png(path, image, info)
    with Image.open(path) as back:
        assert back.format == "PNG" and back.mode == mode
        assert np.array_equal(np.asarray(back), np.asarray(image))
        if mode == "RGB":
            assert back.text["Description"] == "NORMAL ü\nfooter"
    assert read_identity(path) == ('{"path": "x"}' if mode == "RGB" else "id")


def test_identity_of_an_existing_overlay_is_read_from_its_header_without_decoding_the_pixels(tmp_path):
    """A rerun into the same --cam-dir reads every existing overlay's identity before replacing it:
    from the text chunk ahead of the pixel data, not by decoding the image (5 ms an overlay). An
    overlay whose pixel data is cut short is still recognized as this input's own."""
    from cxr_deploy.batch.overlay import read_identity, save_overlay

    spec = PreprocessSpec(input_size=224)
    pixels = _lesion_image(300, 500, (50, 100, 50, 100))
    image, _ = render_overlay(view_image(pixels), _detector_cam(spec, pixels), spec, (300, 500), "NORMAL")
    path = save_overlay(image, [tmp_path / "o.png"], '{"path": "a"}', "NORMAL")
    data = open(path, "rb").read()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: data.index(b"IDAT") + 200])  # header and text intact, pixel data truncated
    assert read_identity(path) == read_identity(cut) == '{"path": "a"}'
    foreign = tmp_path / "foreign.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(foreign)
    assert read_identity(foreign) is None
