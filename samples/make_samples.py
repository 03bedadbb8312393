"""Rebuild samples/ from the shared real-data set (developer tool; needs the `dev` extra).

    python samples/make_samples.py [--source ../shared/data/cxr]

Copies a few real chest X-rays (Kermany et al. 2018, CC BY 4.0; see samples/README.md), scaled to a
longest side of 1024 px, and writes DICOM versions of some of them with highdicom, each exercising a
different part of the reader:

- ``dicom/normal_dx_16bit_rescale_window.dcm``: MONOCHROME2, 16-bit allocated / 12 stored, with
  RescaleSlope/Intercept and a window chosen so that the displayed image equals the JPEG;
- ``dicom/pneumonia_cr_monochrome1.dcm``: MONOCHROME1 (inverted storage) with a window;
- ``dicom/normal_jpeg_baseline.dcm``: JPEG Baseline compressed, 8-bit MONOCHROME2;
- ``dicom/IM000004``: no file extension (as PACS exports often are), 16-bit MONOCHROME2.

Patient name/ID in the DICOMs are synthetic ("Demo^Sample", DEMO-000n). highdicom has no CR/DX
constructor, so each file is built as a Secondary Capture and then given the radiograph SOP class
(CR Image Storage or DX For Presentation) and modality it stands for: cxr-deploy scores only
radiograph objects (see cxr_deploy/eligibility.py).
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.uid import JPEGBaseline8Bit, generate_uid

HERE = Path(__file__).resolve().parent
MAX_SIDE = 1024
# (label, file in the shared manifest); one PNEUMONIA original is stored as RGB on purpose.
CHOSEN = [
    ("NORMAL", "NORMAL/kermany_trainnative__IM-0147-0001.jpeg"),
    ("NORMAL", "NORMAL/kermany_trainnative__IM-0172-0001.jpeg"),
    ("NORMAL", "NORMAL/kermany_trainnative__IM-0178-0001.jpeg"),
    ("NORMAL", "NORMAL/kermany_trainnative__IM-0201-0001.jpeg"),
    ("PNEUMONIA", "PNEUMONIA/kermany_trainnative__person1020_virus_1710.jpeg"),
    ("PNEUMONIA", "PNEUMONIA/kermany_trainnative__person1026_bacteria_2957.jpeg"),
    ("PNEUMONIA", "PNEUMONIA/kermany_trainnative__person1031_virus_1723.jpeg"),
    ("PNEUMONIA", "PNEUMONIA/kermany_trainnative__person1186_virus_2021.jpeg"),  # RGB original
]


def _scaled(path: Path) -> Image.Image:
    image = Image.open(path)
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image  # keeps the original colour mode (the reader must cope with RGB)


def _sc_image(gray8: np.ndarray, *, stored: np.ndarray, photometric: str, n: int, tsuid: str | None = None):
    kwargs = {"transfer_syntax_uid": tsuid} if tsuid else {}
    ds = hd.sc.SCImage(
        pixel_array=stored,
        photometric_interpretation=photometric,
        bits_allocated=16 if stored.dtype == np.uint16 else 8,
        coordinate_system="PATIENT",
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=n,
        manufacturer="cxr-deploy samples",
        patient_id=f"DEMO-{n:04d}",
        patient_name="Demo^Sample",
        patient_orientation=("L", "F"),
        **kwargs,
    )
    return as_radiograph(ds, "CR" if photometric == "MONOCHROME1" else "DX")


SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}


def as_radiograph(ds, modality: str):
    """Give a highdicom SC object the SOP class and attributes of a frontal chest CR/DX image."""
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    for keyword in ("ConversionType",):  # Secondary Capture only
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def build(source: Path) -> None:
    images_dir, dicom_dir = HERE / "images", HERE / "dicom"
    for folder in (images_dir, dicom_dir):
        shutil.rmtree(folder, ignore_errors=True)
    rows = []
    grays = {}
    for label, rel in CHOSEN:
        image = _scaled(source / rel)
        out = images_dir / label / Path(rel).name.replace("kermany_trainnative__", "")
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out, quality=90)
        rows.append((out.relative_to(HERE).as_posix(), label))
        grays[rel] = np.asarray(image.convert("L"))
    dicom_dir.mkdir()

    # 1. MONOCHROME2, 12 bits stored in 16, rescale + window: displayed value == JPEG gray / 255.
    g = grays[CHOSEN[0][1]].astype(np.float64)
    stored = np.round(g * 4000 / 255 + 200).astype(np.uint16)  # modality value = 2*stored - 400
    ds = _sc_image(g, stored=stored, photometric="MONOCHROME2", n=1)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 2, -400, "US"
    ds.WindowCenter, ds.WindowWidth = 4000, 8001
    ds.save_as(dicom_dir / "normal_dx_16bit_rescale_window.dcm")
    rows.append(("dicom/normal_dx_16bit_rescale_window.dcm", CHOSEN[0][0]))

    # 2. MONOCHROME1: high stored values are dark; the reader inverts after the window.
    g = grays[CHOSEN[4][1]].astype(np.float64)
    stored = np.round(4095 - g * 4095 / 255).astype(np.uint16)
    ds = _sc_image(g, stored=stored, photometric="MONOCHROME1", n=2)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.save_as(dicom_dir / "pneumonia_cr_monochrome1.dcm")
    rows.append(("dicom/pneumonia_cr_monochrome1.dcm", CHOSEN[4][0]))

    # 3. JPEG Baseline compressed (lossy), 8-bit MONOCHROME2.
    g = grays[CHOSEN[1][1]]
    ds = _sc_image(g, stored=g.astype(np.uint8), photometric="MONOCHROME2", n=3, tsuid=JPEGBaseline8Bit)
    ds.save_as(dicom_dir / "normal_jpeg_baseline.dcm")
    rows.append(("dicom/normal_jpeg_baseline.dcm", CHOSEN[1][0]))

    # 4. No extension, 16-bit MONOCHROME2 without window (reader falls back to min-max).
    g = grays[CHOSEN[5][1]].astype(np.float64)
    stored = np.round(g * 16).astype(np.uint16)
    ds = _sc_image(g, stored=stored, photometric="MONOCHROME2", n=4)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(dicom_dir / "IM000004")
    rows.append(("dicom/IM000004", CHOSEN[5][0]))

    with open(HERE / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"wrote {len(rows)} samples, {total / 1e6:.1f} MB in {HERE}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=HERE.parent.parent / "shared" / "data" / "cxr")
    build(parser.parse_args().source)
