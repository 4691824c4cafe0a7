"""DICOM decoding of radiographs: pixels, modality LUT, windowing, metadata.

`decode_dicom` turns one DICOM file into a `DecodedImage` (float32 [H, W] in [0, 1], high =
dense) plus the metadata the records keep. The steps follow PS3.3 C.11 in order:
stored values (BitsStored / PixelRepresentation handled by pydicom) -> modality LUT
(RescaleSlope/Intercept or Modality LUT Sequence) -> a windowing policy -> MONOCHROME1 inversion.

RAD-DINO min-max scaled every DICOM to [0, 255] (recipe s8), so policy "minmax" reproduces it;
"dicom" honours the file's VOI LUT / window; "percentile" clips outliers (burnt-in labels,
collimator edges) first.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import warnings
from typing import Any

import numpy as np
import pydicom
from etils import epath
from pydicom import pixels as pydicom_pixels
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from raddino_jax.data.images import (
    DecodedImage,
    DecodeError,
    empty_metadata,
    read_input,
    rgb_to_luminance,
)

WINDOWING_POLICIES = ("dicom", "minmax", "percentile")
MULTIFRAME_POLICIES = ("first", "reject")
COLOUR_POLICIES = ("convert", "reject")

# Plausible detector/pixel spacing in mm; outside this the tag is garbage (e.g. RG1's "0\0").
MIN_PIXEL_SPACING_MM = 0.01
MAX_PIXEL_SPACING_MM = 5.0

_PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"  # (7FE0,0010) as written in little-endian files
_AGE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([DWMY]?)\s*$", re.IGNORECASE)
_DAYS_PER_YEAR = 365.25
_AGE_UNIT_IN_YEARS = {"D": 1 / _DAYS_PER_YEAR, "W": 7 / _DAYS_PER_YEAR, "M": 1 / 12, "Y": 1.0}
_COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")


@dataclasses.dataclass(frozen=True)
class DecodePolicy:
    """How to turn stored values into [0, 1] and what to do with unusual files.

    Attributes:
      windowing: "dicom" (VOI LUT sequence, else first WindowCenter/Width with VOILUTFunction,
        else min-max), "minmax" (full range; RAD-DINO's choice, recipe s8) or "percentile".
      percentiles: (low, high) in percent for "percentile".
      multiframe: "first" (keep frame 0, num_frames records the count) or "reject".
      colour: "convert" (BT.601 luminance) or "reject".
      source: dataset name written into the metadata.
    """

    windowing: str = "minmax"
    percentiles: tuple[float, float] = (0.5, 99.5)
    multiframe: str = "first"
    colour: str = "convert"
    source: str = ""

    def __post_init__(self):
        _check_choice("windowing", self.windowing, WINDOWING_POLICIES)
        _check_choice("multiframe", self.multiframe, MULTIFRAME_POLICIES)
        _check_choice("colour", self.colour, COLOUR_POLICIES)
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low, high}")


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"DecodePolicy.{field} must be one of {choices}, got {value!r}")


# ------------------------------------------------------------------------------------------
# Metadata parsing
# ------------------------------------------------------------------------------------------


def parse_age(age_string: str | None) -> float:
    """Age in years from a DICOM AS string ('045Y', '006M', '010W', '003D'); NaN if unknown.

    A bare number ('45') is read as years, a lenient reading of a common non-conformance.
    """
    match = _AGE_PATTERN.match(str(age_string or ""))
    if match is None:
        return math.nan
    value, unit = float(match.group(1)), (match.group(2) or "Y").upper()
    return value * _AGE_UNIT_IN_YEARS[unit]


def parse_sex(sex: str | None) -> str:
    """'M', 'F', 'O' or '' (unknown) from a PatientSex value (case/whitespace tolerant)."""
    value = str(sex or "").strip().upper()[:1]
    return value if value in ("M", "F", "O") else ""


def validate_pixel_spacing(spacing: Any) -> tuple[float, float] | None:
    """(row, col) spacing in mm if both values are numbers within [0.01, 5] mm, else None."""
    try:
        values = [float(v) for v in spacing]
    except (TypeError, ValueError):  # None, or not numbers
        return None
    if len(values) == 2 and all(MIN_PIXEL_SPACING_MM <= v <= MAX_PIXEL_SPACING_MM for v in values):
        return values[0], values[1]
    return None


def pixel_spacing_mm(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """Valid spacing from PixelSpacing, else ImagerPixelSpacing (the CR/DX detector plane)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = validate_pixel_spacing(ds.get(keyword))
        if spacing is not None:
            return spacing
    return None


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def dicom_metadata(ds: pydicom.Dataset, source: str) -> dict[str, Any]:
    """The record metadata of a dataset (see images.METADATA_KEYS)."""
    metadata = empty_metadata(source, int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
    metadata.update(
        patient_id=_text(ds, "PatientID"),
        sex=parse_sex(ds.get("PatientSex")),
        age_years=parse_age(ds.get("PatientAge")),
        view_position=_text(ds, "ViewPosition"),
        body_part=_text(ds, "BodyPartExamined"),
        modality=_text(ds, "Modality"),
        manufacturer=_text(ds, "Manufacturer"),
        pixel_spacing_mm=pixel_spacing_mm(ds),
        photometric=_text(ds, "PhotometricInterpretation"),
        bits_stored=int(ds.get("BitsStored", 0) or 0),
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
        num_frames=int(ds.get("NumberOfFrames", 1) or 1),
    )
    return metadata


# ------------------------------------------------------------------------------------------
# Windowing: all outputs in [0, 1]
# ------------------------------------------------------------------------------------------


def _window_module(center: float, width: float, function: str) -> pydicom.Dataset:
    """A VOI LUT module holding one window, for pydicom's `apply_windowing`.

    pydicom maps a window onto the output range of the stored pixels; a 1-bit unsigned image
    without rescale has the output range [0, 1], so the window lands on [0, 1] directly.
    """
    module = pydicom.Dataset()
    module.PhotometricInterpretation = "MONOCHROME2"
    module.BitsStored = 1
    module.PixelRepresentation = 0
    # FD instead of the tags' DS VR: the values stay exact floats, never a 16-character string.
    module.add_new(0x00281050, "FD", float(center))  # WindowCenter
    module.add_new(0x00281051, "FD", float(width))  # WindowWidth
    module.VOILUTFunction = function
    return module


# VOILUTFunction -> smallest width it is applied with (see the window_* functions).
_VOI_MIN_WIDTH = {"LINEAR": 1.0, "LINEAR_EXACT": 1e-12, "SIGMOID": 1e-12}


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    width = max(float(width), _VOI_MIN_WIDTH[function])
    with np.errstate(over="ignore"):  # SIGMOID far outside the window: exp overflows to inf -> 0
        out = pydicom_pixels.apply_windowing(
            np.asarray(values, np.float64), _window_module(center, width, function)
        )
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def window_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window mapped onto [0, 1]; widths below 1 count as 1."""
    return _window(values, center, width, "LINEAR")


def window_linear_exact(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.2 LINEAR_EXACT window mapped onto [0, 1] (width > 0)."""
    return _window(values, center, width, "LINEAR_EXACT")


def window_sigmoid(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.1 SIGMOID window mapped onto [0, 1] (width > 0)."""
    return _window(values, center, width, "SIGMOID")


def _rescale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """[low, high] -> [0, 1] linearly, clipped, float32; zeros when the range is empty."""
    if high <= low:
        return np.zeros(values.shape, np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


def window_minmax(values: np.ndarray) -> np.ndarray:
    """Full-range linear scaling to [0, 1]; a constant image maps to zeros."""
    return _rescale(values, float(values.min()), float(values.max()))


def window_percentile(values: np.ndarray, low_pct: float, high_pct: float) -> np.ndarray:
    """Clip to the [low_pct, high_pct] percentiles, then scale linearly to [0, 1]."""
    low, high = np.percentile(values, [low_pct, high_pct])
    return window_minmax(values) if high <= low else _rescale(values, low, high)


def window_voi_lut(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The first VOI LUT Sequence item (PS3.3 C.11.2.1.1), normalised by the LUT's own range.

    pydicom's `apply_voi` reads and applies the LUT: inputs below the first mapped value take
    the first entry, inputs beyond the last take the last entry.
    """
    entries, first_mapped, _bits = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
    domain = np.arange(first_mapped, first_mapped + (entries or 65536))
    # Round to the LUT's integer inputs and clamp them to its domain first: pydicom indexes
    # through the LUT's unsigned dtype, where values far outside would wrap around.
    inputs = np.clip(np.rint(values), domain[0], domain[-1]).astype(np.int64)
    table = pydicom_pixels.apply_voi(domain, ds).astype(np.float32)
    looked_up = pydicom_pixels.apply_voi(inputs, ds).astype(np.float32)
    return _rescale(looked_up, float(table.min()), float(table.max()))


def _first_value(value: Any) -> float:
    """First entry of a possibly multi-valued DS element (recipe: take the first window)."""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0]
    return float(value)


def window_dicom(values: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, str]:
    """Window with the file's own VOI: LUT sequence, else first window, else min-max.

    Returns:
      (pixels float32 [H, W] in [0, 1], which method was used: "voi_lut", "window_linear",
      "window_linear_exact", "window_sigmoid" or "minmax_fallback").
    """
    if ds.get("VOILUTSequence"):
        return window_voi_lut(values, ds), "voi_lut"
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center = _first_value(ds.WindowCenter)
            width = _first_value(ds.WindowWidth)
        except (TypeError, ValueError, IndexError):
            center, width = math.nan, math.nan
        if math.isfinite(center) and math.isfinite(width) and width > 0:
            function = str(ds.get("VOILUTFunction", "") or "").strip().upper()
            function = function if function in _VOI_MIN_WIDTH else "LINEAR"
            return _window(values, center, width, function), f"window_{function.lower()}"
    return window_minmax(values), "minmax_fallback"


def apply_windowing(
    values: np.ndarray, ds: pydicom.Dataset, policy: DecodePolicy
) -> tuple[np.ndarray, str]:
    """Map modality-LUT output values [H, W] to [0, 1] under `policy.windowing`."""
    if policy.windowing == "dicom":
        return window_dicom(values, ds)
    if policy.windowing == "percentile":
        low, high = policy.percentiles
        return window_percentile(values, low, high), f"percentile_{low:g}_{high:g}"
    return window_minmax(values), "minmax"


# ------------------------------------------------------------------------------------------
# Reading and decoding
# ------------------------------------------------------------------------------------------


def read_dataset(data: bytes, name: str) -> pydicom.Dataset:
    """Parse DICOM bytes; files without the 128-byte preamble are accepted if they hold an image.

    Raises:
      DecodeError: empty_file, not_dicom or truncated.
    """
    if not data:
        raise DecodeError("empty_file", name, "the file has zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except InvalidDicomError:
            ds = _read_without_preamble(data, name)
        except (EOFError, OSError) as error:
            raise DecodeError(
                "truncated", name, f"ends inside a header element ({error})"
            ) from error
        except Exception as error:  # noqa: BLE001 - any parser failure is a bad file
            raise DecodeError(
                "decode_error", name, f"pydicom could not parse it ({error})"
            ) from error
    if "TransferSyntaxUID" not in ds.file_meta:
        # Legacy files without meta header: pydicom knows how it actually read them.
        implicit, _little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        )
    return ds


def _read_without_preamble(data: bytes, name: str) -> pydicom.Dataset:
    """Force-read a file with no 'DICM' marker; accept it only if it has an image module.

    A forced parse of arbitrary bytes "succeeds" with junk elements, so a file only counts as
    DICOM here if it carries an SOP Class UID or Modality; without Rows/Columns it has no image.
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        has_image_module = "Rows" in ds and "Columns" in ds
        is_dicom = has_image_module or "SOPClassUID" in ds or "Modality" in ds
    except Exception:  # noqa: BLE001 - garbage bytes make the forced parser fail anywhere
        has_image_module = is_dicom = False
    if not is_dicom:
        raise DecodeError("not_dicom", name, "no DICOM preamble and no DICOM attributes")
    if not has_image_module:
        raise DecodeError("no_pixel_data", name, "a DICOM dataset without an image")
    return ds


def _classify_pixel_error(error: Exception) -> str:
    """Map a pydicom pixel-decoding exception onto a rejection reason."""
    text = str(error).lower()
    if isinstance(error, NotImplementedError) or "no pixel data decoders" in text:
        return "no_decoder"
    if "is not supported" in text or ("plugin" in text and "available" in text):
        return "no_decoder"
    truncation_phrases = ("less than expected", "end of file", "unexpected end", "truncat")
    if isinstance(error, EOFError) or any(p in text for p in truncation_phrases):
        return "truncated"
    return "decode_error"


def stored_pixels(ds: pydicom.Dataset, data: bytes, name: str, policy: DecodePolicy):
    """Decode the stored values of frame 0 (or the only frame): [H, W] or [H, W, 3] array.

    pydicom applies BitsStored masking and PixelRepresentation sign extension and converts
    YBR to RGB. Raises DecodeError for multi-frame/colour under "reject" and decode failures.
    """
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        # pydicom silently drops a Pixel Data element cut short by EOF: tell that from absence.
        reason = "truncated" if _PIXEL_DATA_TAG_LE in data else "no_pixel_data"
        raise DecodeError(reason, name, "the file has no (complete) Pixel Data element")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        if policy.multiframe == "reject":
            raise DecodeError("multiframe", name, f"{frames} frames (policy reject)")
        ds.pixel_array_options(index=0)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    is_colour = photometric in _COLOUR_PHOTOMETRICS or int(ds.get("SamplesPerPixel", 1)) > 1
    if is_colour and policy.colour == "reject":
        raise DecodeError("colour", name, f"{photometric} image (policy reject)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            array = ds.pixel_array
        except Exception as error:  # noqa: BLE001 - classified into a reason below
            raise DecodeError(_classify_pixel_error(error), name, str(error)) from error
        if photometric == "PALETTE COLOR":
            array = apply_color_lut(array, ds)
    return array, is_colour


def modality_values(array: np.ndarray, ds: pydicom.Dataset, is_colour: bool) -> np.ndarray:
    """Stored values -> modality values (e.g. CT Hounsfield units), float64 [H, W].

    Greyscale: pydicom's apply_modality_lut (RescaleSlope/Intercept or Modality LUT Sequence).
    Colour ([H, W, 3] RGB): BT.601 luminance; the modality LUT is defined for greyscale only.
    """
    if is_colour:
        values = rgb_to_luminance(array).astype(np.float64)
    else:
        values = np.asarray(apply_modality_lut(array, ds), dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"unexpected decoded shape {values.shape}")
    return values


def decode_dicom(
    path_or_bytes: str | epath.PathLike | bytes, policy: DecodePolicy | None = None
) -> DecodedImage:
    """Decode a DICOM file into a [0, 1] float image with high = dense, plus metadata.

    The steps of the module docstring; MONOCHROME1 is inverted (1 - x) so air is dark.

    `path_or_bytes` is a path (local or gs://) or the file's bytes.

    Returns:
      DecodedImage: pixels float32 [Rows, Columns] in [0, 1]; metadata per images.METADATA_KEYS
      with `windowing` naming the method used.
    Raises:
      DecodeError: with reason in images.REJECTION_REASONS.
    """
    policy = policy or DecodePolicy()
    name, data = read_input(path_or_bytes)
    ds = read_dataset(data, name)
    metadata = dicom_metadata(ds, policy.source)
    array, is_colour = stored_pixels(ds, data, name, policy)
    try:
        values = modality_values(array, ds, is_colour)
        pixels, method = apply_windowing(values, ds, policy)
    except Exception as error:  # noqa: BLE001 - malformed LUTs etc.; reported, not fatal
        raise DecodeError("decode_error", name, f"LUT/windowing failed ({error})") from error
    if metadata["photometric"].upper() == "MONOCHROME1":
        pixels = 1.0 - pixels
    metadata["windowing"] = method
    metadata["orig_height"], metadata["orig_width"] = pixels.shape
    return DecodedImage(pixels=np.ascontiguousarray(pixels, dtype=np.float32), metadata=metadata)


def looks_like_dicom(path: epath.PathLike) -> bool:
    """True if the file carries the 'DICM' marker at byte 128 (for extensionless files)."""
    with epath.Path(path).open("rb") as handle:
        header = handle.read(132)
    return len(header) == 132 and header[128:132] == b"DICM"
