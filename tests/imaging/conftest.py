"""Factories for hand-built DICOM and raster files with known pixel values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                preamble: bool = True, **attributes) -> Path:
    """Minimal uncompressed DICOM (Secondary Capture) holding ``pixels`` exactly."""
    pixels = np.ascontiguousarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "PID-123", "20200101"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=preamble)
    if not preamble:  # strip preamble + file meta: a bare data set, as some PACS exports are
        bare = pydicom.dcmread(path)
        bare.preamble = None
        bare.file_meta = FileMetaDataset()
        bare.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return path


@pytest.fixture
def make_dicom(tmp_path):
    counter = iter(range(10_000))

    def factory(pixels, name: str | None = None, **kwargs) -> Path:
        return write_dicom(tmp_path / (name or f"img{next(counter)}.dcm"), np.asarray(pixels), **kwargs)

    return factory
