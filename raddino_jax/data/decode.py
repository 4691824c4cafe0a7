"""Which decoder an input file needs, chosen from its name (or its DICOM marker).

Both the dataset builder and inference (`data.preprocess`, `extract`) read radiographs through
here: `.dcm`/`.dicom` and extensionless files carrying the 'DICM' marker are DICOM
(`data.dicom`), `.png`/`.jpg`/`.jpeg` are rasters (`data.images`).
"""

from __future__ import annotations

from etils import epath

from raddino_jax.data.dicom import DecodePolicy, decode_dicom, looks_like_dicom
from raddino_jax.data.images import DecodedImage, decode_raster

DICOM_SUFFIXES = (".dcm", ".dicom")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")


def classify_file(path: epath.PathLike) -> str | None:
    """'dicom', 'raster' or None (not an input) from the suffix, sniffing extensionless files."""
    path = epath.Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in RASTER_SUFFIXES:
        return "raster"
    if suffix == "":
        try:
            return "dicom" if looks_like_dicom(path) else None
        except OSError:
            return None
    return None


def decode_file(path: epath.PathLike, policy: DecodePolicy | None = None) -> DecodedImage:
    """Decode a PNG/JPEG by suffix, anything else as DICOM (raises images.DecodeError)."""
    policy = policy or DecodePolicy()
    if epath.Path(path).suffix.lower() in RASTER_SUFFIXES:
        return decode_raster(path, source=policy.source, colour=policy.colour)
    return decode_dicom(path, policy)
