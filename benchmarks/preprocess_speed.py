"""Per-image read + preprocessing time: a 1024² 8-bit PNG and a 2048² 16-bit DICOM.

    python benchmarks/preprocess_speed.py [--repeats 30] [--threads 1]

Prints median milliseconds per image for: decode only (read_image), preprocessing only
(PreprocessSpec.apply), both, and the naive path (PIL open -> convert("RGB") -> torchvision
Resize(256)+CenterCrop(224)+ToTensor+Normalize) on the same files. Inputs are synthetic but shaped
like radiographs (smooth body, ribs, noise) so PNG compression behaves realistically.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_radiograph(size: int, seed: int = 0) -> np.ndarray:
    """[0, 1] float image: bright body, darker lungs, rib bands, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((x - 0.5) / 0.42) ** 2 + ((y - 0.55) / 0.5) ** 2) ** 2)
    lungs = sum(np.exp(-(((x - cx) / 0.14) ** 2 + ((y - 0.5) / 0.28) ** 2) ** 2) for cx in (0.32, 0.68))
    ribs = 0.08 * (np.sin(y * 60) > 0.6) * (lungs > 0.2)
    img = 0.85 * body - 0.45 * lungs + ribs + rng.normal(0, 0.01, (size, size))
    return np.clip(img, 0, 1).astype(np.float32)


def write_inputs(folder: Path) -> tuple[Path, Path]:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    png = folder / "chest_1024.png"
    Image.fromarray(np.round(synthetic_radiograph(1024) * 255).astype(np.uint8)).save(png)
    stored = np.round(synthetic_radiograph(2048, seed=1) * 16383).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(folder / "chest_2048.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME2"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 2048, 2048, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 14, 13, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    ds.WindowCenter, ds.WindowWidth = 7000, 14000
    ds.PixelData = stored.tobytes()
    ds.save_as(folder / "chest_2048.dcm", enforce_file_format=True)
    assert pydicom.dcmread(folder / "chest_2048.dcm").Rows == 2048
    return png, folder / "chest_2048.dcm"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (imports, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def naive(path: Path):
    import torch
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    if path.suffix == ".dcm":  # naive DICOM: pixel_array -> min-max 8-bit -> PIL RGB
        import pydicom

        arr = pydicom.dcmread(path).pixel_array.astype(np.float32)
        arr = (arr - arr.min()) / (arr.max() - arr.min()) * 255
        image = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    else:
        image = Image.open(path).convert("RGB")
    with torch.no_grad():
        return tf(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the naive path")
    args = parser.parse_args()

    import torch

    from cxr_deploy.imaging import read_image
    from cxr_deploy.preprocessing import PreprocessSpec

    torch.set_num_threads(args.threads)
    spec = PreprocessSpec()
    with tempfile.TemporaryDirectory() as tmp:
        png, dcm = write_inputs(Path(tmp))
        print(f"{'input':<26}{'decode':>9}{'preprocess':>12}{'total':>9}{'naive':>9}   (median ms/image, {args.repeats} runs)")
        for label, path in (("1024² 8-bit PNG", png), ("2048² 16-bit DICOM", dcm)):
            pixels = read_image(path).pixels
            decode = median_ms(lambda: read_image(path), args.repeats)
            prep = median_ms(lambda: spec.apply(pixels), args.repeats)
            total = median_ms(lambda: spec.apply(read_image(path).pixels), args.repeats)
            slow = median_ms(lambda: naive(path), args.repeats)
            print(f"{label:<26}{decode:>9.1f}{prep:>12.1f}{total:>9.1f}{slow:>9.1f}")


if __name__ == "__main__":
    main()
