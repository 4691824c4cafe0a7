"""Store a phantom image as a real DICOM file, varying everything a decoder must handle.

`DicomVariant` + `encode_dicom` write an image from `phantoms.render_phantom` as a DICOM Part 10
file in which the stored-value mapping, photometric interpretation, bit depth, signedness,
rescale, windowing and transfer syntax all vary (`VARIANTS`), so that the decoder
(`raddino_jax.data.dicom`) is exercised on every path it must handle.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import uuid

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from data_prep.samples.phantoms import PhantomParams

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_IMAGE_STORAGE_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")


@dataclasses.dataclass(frozen=True)
class DicomVariant:
    """How one phantom is stored: the knobs a DICOM decoder must get right.

    Stored values are an affine function of the image so that, after the modality LUT
    (slope/intercept) and inverting MONOCHROME1, every variant yields the same anatomy.
    """

    transfer_syntax: UID
    photometric: str  # "MONOCHROME1" (bright = low value) or "MONOCHROME2"
    bits_stored: int
    signed: bool
    rescale_slope: float = 1.0
    rescale_intercept: float | None = None  # None: 0 unsigned, or 2^(B-1)*slope signed
    window: bool = False
    voi_lut: bool = False
    modality: str = "CR"

    @property
    def intercept(self) -> float:
        """RescaleIntercept; for signed data it shifts stored values back to >= 0."""
        if self.rescale_intercept is not None:
            return self.rescale_intercept
        return float(2 ** (self.bits_stored - 1)) * self.rescale_slope if self.signed else 0.0


# Cycled over the phantoms. The table covers both photometric interpretations, every bit
# depth, signed and unsigned storage, non-identity rescale, windows and VOI LUTs, and each
# transfer syntax; DX rows keep the identity rescale the DX IOD requires.
VARIANTS: tuple[DicomVariant, ...] = (
    DicomVariant(ExplicitVRLittleEndian, "MONOCHROME2", 12, False, window=True, modality="DX"),
    DicomVariant(ImplicitVRLittleEndian, "MONOCHROME1", 12, False),
    DicomVariant(RLELossless, "MONOCHROME2", 16, True),
    DicomVariant(JPEG2000Lossless, "MONOCHROME1", 14, False, window=True, modality="DX"),
    DicomVariant(JPEGLSLossless, "MONOCHROME2", 10, False, modality="DX"),
    DicomVariant(ExplicitVRLittleEndian, "MONOCHROME2", 12, False, voi_lut=True, modality="DX"),
    DicomVariant(ExplicitVRLittleEndian, "MONOCHROME1", 16, True, 0.5, window=True),
    DicomVariant(ImplicitVRLittleEndian, "MONOCHROME2", 14, True),
    DicomVariant(RLELossless, "MONOCHROME1", 10, False, 2.0, -1024.0, window=True),
    DicomVariant(JPEG2000Lossless, "MONOCHROME2", 16, False, modality="DX"),
    DicomVariant(JPEG2000Lossless, "MONOCHROME1", 12, True, 1.0, 1000.0),
    DicomVariant(RLELossless, "MONOCHROME1", 14, False, voi_lut=True),
)


def _rle_plugin() -> str:
    """pylibjpeg-rle (compiled) when installed, else pydicom's pure-Python RLE encoder
    (~10x slower; both produce valid RLE, not necessarily identical bytes)."""
    plugins = get_encoder(RLELossless).available_plugins
    return "pylibjpeg" if "pylibjpeg" in plugins else "pydicom"


def _encoding_plugin(transfer_syntax: UID) -> str:
    """The encoder plugin to use, pinned so that output bytes do not depend on which
    optional encoders pydicom happens to try first."""
    if transfer_syntax == RLELossless:
        return _rle_plugin()
    if transfer_syntax == JPEG2000Lossless:
        return "pylibjpeg"
    return ""


def syntax_available(transfer_syntax: UID) -> bool:
    """Whether this machine can write `transfer_syntax` (uncompressed always can)."""
    if not transfer_syntax.is_compressed:
        return True
    try:
        return bool(get_encoder(transfer_syntax).is_available)
    except NotImplementedError:
        return False


def stored_values(image: np.ndarray, variant: DicomVariant) -> np.ndarray:
    """Map image [H, W] in [0, 1] (bright = dense) to stored pixel values (uint16 / int16).

    MONOCHROME1 stores (1 - image); signed storage subtracts 2^(B-1), which the variant's
    RescaleIntercept adds back.
    """
    levels = 2**variant.bits_stored - 1
    value = image if variant.photometric == "MONOCHROME2" else 1.0 - image
    stored = np.rint(np.clip(value, 0.0, 1.0) * levels).astype(np.int64)
    if variant.signed:
        return (stored - 2 ** (variant.bits_stored - 1)).astype(np.int16)
    return stored.astype(np.uint16)


def _modality_range(variant: DicomVariant, stored: np.ndarray) -> tuple[float, float]:
    """(min, max) of the modality values of this image's stored values."""
    low = float(stored.min()) * variant.rescale_slope + variant.intercept
    high = float(stored.max()) * variant.rescale_slope + variant.intercept
    return low, high


@functools.cache
def _voi_lut_item(bits_stored: int) -> Dataset:
    """The VOI LUT item for `bits_stored`, built once: pydicom validates each of the up to
    65,536 LUT entries on assignment, ~50 ms per file, a third of the generator's time."""
    entries = 2**bits_stored
    inputs = np.arange(entries, dtype=np.float64) / (entries - 1)
    curve = 1.0 / (1.0 + np.exp(-8.0 * (inputs - 0.5)))
    curve = (curve - curve[0]) / (curve[-1] - curve[0])
    item = Dataset()
    item.add_new(0x00283002, "US", [entries % 65536, 0, 16])  # LUTDescriptor
    item.LUTExplanation = "SIGMOID"
    item.add_new(0x00283006, "US", np.rint(curve * 65535).astype(np.uint16).tolist())
    return item


def _add_voi_lut(ds: Dataset, variant: DicomVariant) -> None:
    """A monotonic sigmoid VOI LUT over the full stored range (unsigned, slope 1 only)."""
    ds.VOILUTSequence = DicomSequence([_voi_lut_item(variant.bits_stored)])


@dataclasses.dataclass(frozen=True)
class DicomMeta:
    """Study-level attributes written alongside the pixels (all chosen deterministically)."""

    patient_id: str
    study_uid: str
    series_uid: str
    instance_uid: str
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS
    manufacturer: str
    view_position: str  # "PA" or "AP"
    pixel_spacing: tuple[float, float] | None  # None: attribute left out
    instance_number: int = 1


def deterministic_uid(*parts: object) -> str:
    """A '2.25.<uuid>' UID from a name-based (SHA-1, version 5) UUID of `parts` (seed,
    patient, index...): stable across runs and machines, never random. (pydicom's
    generate_uid ignores its entropy sources when prefix is None and returns uuid4.)"""
    name = "|".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def encode_dicom(
    image: np.ndarray, params: PhantomParams, variant: DicomVariant, meta: DicomMeta
) -> bytes:
    """Encode `image` (float32 [H, W] in [0, 1], bright = dense) as a DICOM Part 10 file.

    Raises ValueError for a transfer syntax with no encoder here (see `syntax_available`),
    or for a VOI LUT requested on anything but unsigned, identity-rescaled data.
    """
    if not syntax_available(variant.transfer_syntax):
        raise ValueError(f"no encoder available for {variant.transfer_syntax.name}")
    sop_class = CR_IMAGE_STORAGE if variant.modality == "CR" else DX_IMAGE_STORAGE_FOR_PRESENTATION
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = sop_class
    file_meta.MediaStorageSOPInstanceUID = meta.instance_uid
    file_meta.TransferSyntaxUID = variant.transfer_syntax
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = meta.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = meta.study_time
    ds.AccessionNumber = ""
    ds.Modality = variant.modality
    if variant.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = meta.manufacturer
    ds.ManufacturerModelName = "Phantom"
    ds.ReferringPhysicianName = ""
    ds.PatientName = f"PHANTOM^{meta.patient_id}"
    ds.PatientID = meta.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = params.sex
    ds.PatientAge = f"{params.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = meta.view_position
    ds.StudyInstanceUID = meta.study_uid
    ds.SeriesInstanceUID = meta.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = meta.instance_number
    ds.PatientOrientation = ["L", "F"]  # patient's right on the image's left
    ds.BurnedInAnnotation = "NO"
    if meta.pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:.4g}" for v in meta.pixel_spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = variant.photometric
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated = 16
    ds.BitsStored = variant.bits_stored
    ds.HighBit = variant.bits_stored - 1
    ds.PixelRepresentation = int(variant.signed)
    ds.RescaleSlope = f"{variant.rescale_slope:g}"
    ds.RescaleIntercept = f"{variant.intercept:g}"
    ds.RescaleType = "US"
    stored = stored_values(image, variant)
    if variant.window:
        low, high = _modality_range(variant, stored)
        ds.WindowCenter = f"{(low + high) / 2:.1f}"
        ds.WindowWidth = f"{max(high - low, 1.0):.1f}"
    if variant.voi_lut:
        if variant.signed or variant.rescale_slope != 1.0 or variant.intercept != 0.0:
            raise ValueError("the VOI LUT is written only for unsigned identity-rescaled data")
        _add_voi_lut(ds, variant)
    ds.LossyImageCompression = "00"
    if variant.transfer_syntax.is_compressed:
        ds.compress(
            variant.transfer_syntax,
            stored,
            encoding_plugin=_encoding_plugin(variant.transfer_syntax),
            generate_instance_uid=False,  # the default would draw a random UID
        )
    else:
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
