"""Synthetic DICOM/PNG/TIFF files for the image tests: small, uncompressed, with hand-chosen pixel values.

    >>> from helpers_images import write_dicom
    >>> write_dicom(tmp_path / "ramp.dcm", np.arange(100, dtype=np.uint16).reshape(10, 10), WindowCenter=50)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MG_STORAGE = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation


def write_dicom(path: Path, pixels: np.ndarray, *, transfer_syntax: str = ExplicitVRLittleEndian, **attrs) -> Path:
    """A single-frame MG DICOM with `pixels` (y, x) uint8/uint16/int16 and any extra attributes (keyword=value)."""
    pixels = np.ascontiguousarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_STORAGE
    sop = attrs.pop("SOPInstanceUID", None) or generate_uid(entropy_srcs=[str(path)])
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MG_STORAGE
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = attrs.pop("StudyInstanceUID", "1.2.826.0.1.3680043.8.498.1")
    ds.Modality = "MG"
    ds.PatientName = "Synthetic^Ramp"
    ds.PatientID = "SYN-0001"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = attrs.pop("BitsStored", bits)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def raw_pixels(path) -> np.ndarray:
    """The stored values of a DICOM, decoded by pydicom alone (no store.images involved)."""
    return pydicom.dcmread(path).pixel_array
