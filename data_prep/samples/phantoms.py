"""Procedural frontal chest-radiograph phantoms: the built-in, network-free training data.

A drawn-by-hand chest (body outline, lungs, mediastinum, heart, diaphragm domes, ribs,
clavicles, spine, breasts) whose anatomy depends on the patient (sex, age, build), with
two learnable findings (lung nodules, pleural effusion) and the nuisance variation a real
acquisition has (position, rotation, exposure, contrast, blur, noise).

`sample_patient` / `sample_followup` draw a `PhantomParams`; `render_phantom` turns params +
a noise generator into an image (float32 [H, W] in [0, 1], bright = dense) and a lesion mask
(uint8 [H, W], 0/255). Both are pure functions of their arguments, so evaluation code can use
the generator without files. Storing an image as a DICOM file is `phantom_dicom`'s job.

Conventions: images are shown in the standard PA orientation, the patient's right on the
image's left. Effusion labels name the patient's side: 1 = left (image right),
2 = right (image left).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

EFFUSION_NONE, EFFUSION_LEFT, EFFUSION_RIGHT = 0, 1, 2
MIN_AGE, MAX_AGE = 20, 85

# Canonical anatomy lives in "thorax units": x across (-1 image left .. +1 image right),
# y downwards, origin near the centre of the chest, before pose and thorax scaling.
_LUNG_CENTRE_X = 0.44
_LUNG_CENTRE_Y = -0.02
_LUNG_HALF_WIDTH = 0.32
_LUNG_HALF_HEIGHT = 0.72
_DOME_BASE_OFFSET = 0.60  # lateral end of the dome, below the lung centre
_DOME_HEIGHT = 0.22  # dome apex height above its lateral end
_MEDIASTINUM_HALF_WIDTH = 0.11
_IMAGE_CENTRE_Y = 0.08  # canonical y at the image centre: frames neck to upper abdomen
_LUNG_TEXTURE = 0.025  # amplitude of the vascular-marking texture inside the lungs


# --------------------------------------------------------------------------------------------
# Parameters


@dataclasses.dataclass(frozen=True)
class Nodule:
    """One round lung nodule in canonical thorax units (centre, radius) with its density."""

    x: float
    y: float
    radius: float
    contrast: float


@dataclasses.dataclass(frozen=True)
class PhantomParams:
    """Everything `render_phantom` needs except the noise generator.

    Patient (kept across a patient's studies): sex, age, thorax_scale, lung_width,
    heart_scale, breast_size, bone_contrast, aortic_radius, dome_shift (right, left
    hemidiaphragm height offsets: < 0 raised), nodules, effusion, effusion_level,
    effusion_rise, effusion_opacity. Acquisition (re-drawn per image): height, width,
    shift_x, shift_y, rotation_deg, gain, gamma, offset, tilt, blur_sigma, noise_sigma.
    """

    height: int
    width: int
    sex: str
    age: int
    thorax_scale: float
    lung_width: float
    heart_scale: float
    breast_size: float
    bone_contrast: float
    aortic_radius: float
    nodules: tuple[Nodule, ...]
    effusion: int
    effusion_level: float
    effusion_rise: float
    effusion_opacity: float
    dome_shift: tuple[float, float]
    shift_x: float
    shift_y: float
    rotation_deg: float
    gain: float
    gamma: float
    offset: float
    tilt: float
    blur_sigma: float
    noise_sigma: float

    @property
    def nodule(self) -> int:
        """Binary nodule label: 1 when the image has at least one nodule."""
        return int(len(self.nodules) > 0)


def _sample_image_size(rng: np.random.Generator, base_size: int) -> tuple[int, int]:
    """Width in [S, 1.25 S], height in [width, 1.2 width]: square to portrait (S=256: up to
    320 x 384)."""
    width = int(round(base_size * rng.uniform(1.0, 1.25)))
    height = int(round(width * rng.uniform(1.0, 1.2)))
    return height, width


# Ranges (low, high) of the per-image acquisition parameters, per acquisition profile.
# "standard": an upright PA department radiograph. "portable": a bedside AP film, the demo's
# shifted domain for continued pretraining (issue 23): poorer positioning (more shift and
# rotation), a harder, noisier, blurrier exposure with a stronger heel-effect gradient.
ACQUISITION_PROFILES = {
    "standard": dict(
        shift_x=(-0.08, 0.08),
        shift_y=(-0.08, 0.08),
        rotation_deg=(-4.0, 4.0),
        gain=(0.8, 1.15),
        gamma=(0.8, 1.25),
        offset=(-0.03, 0.08),
        tilt=(-0.05, 0.05),
        blur_sigma=(0.4, 1.2),
        noise_sigma=(0.005, 0.025),
    ),
    "portable": dict(
        shift_x=(-0.14, 0.14),
        shift_y=(-0.04, 0.16),
        rotation_deg=(-9.0, 9.0),
        gain=(0.65, 0.95),
        gamma=(1.3, 1.9),
        offset=(0.04, 0.16),
        tilt=(-0.16, 0.16),
        blur_sigma=(0.9, 1.7),
        noise_sigma=(0.02, 0.045),
    ),
}


def _sample_acquisition(
    rng: np.random.Generator, base_size: int, acquisition: str = "standard"
) -> dict:
    """Per-image nuisance parameters: pose, exposure and detector properties, drawn from the
    `ACQUISITION_PROFILES[acquisition]` ranges."""
    if acquisition not in ACQUISITION_PROFILES:
        raise ValueError(
            f"acquisition must be one of {sorted(ACQUISITION_PROFILES)}, got {acquisition!r}"
        )
    height, width = _sample_image_size(rng, base_size)
    ranges = ACQUISITION_PROFILES[acquisition]
    return dict(
        height=height,
        width=width,
        **{name: float(rng.uniform(low, high)) for name, (low, high) in ranges.items()},
    )


def sample_patient(
    rng: np.random.Generator,
    base_size: int = 256,
    *,
    sex: str | None = None,
    nodule: int | None = None,
    effusion: int | None = None,
    acquisition: str = "standard",
) -> PhantomParams:
    """Draw one patient and one acquisition of them.

    Labels are drawn at random (sex 1:1, nodule 1:1, effusion none/left/right 2:1:1) unless
    given, so a caller can balance them across a data set. `base_size` S sets the image size
    (see `_sample_image_size`); `acquisition` names an `ACQUISITION_PROFILES` entry.
    """
    sex = sex if sex is not None else str(rng.choice(["M", "F"]))
    if sex not in ("M", "F"):
        raise ValueError(f"sex must be 'M' or 'F', got {sex!r}")
    nodule = nodule if nodule is not None else int(rng.integers(0, 2))
    effusion = effusion if effusion is not None else int(rng.choice([0, 0, 1, 2]))
    if effusion not in (EFFUSION_NONE, EFFUSION_LEFT, EFFUSION_RIGHT):
        raise ValueError(f"effusion must be 0, 1 or 2, got {effusion!r}")
    age = int(rng.integers(MIN_AGE, MAX_AGE + 1))
    age_fraction = (age - MIN_AGE) / (MAX_AGE - MIN_AGE)
    male = sex == "M"
    patient = dict(
        sex=sex,
        age=age,
        thorax_scale=float(rng.uniform(1.00, 1.10) if male else rng.uniform(0.92, 1.02)),
        lung_width=float(rng.uniform(0.88, 1.08)),
        heart_scale=float(rng.uniform(0.98, 1.25) if male else rng.uniform(0.85, 1.10)),
        breast_size=0.0 if male else float(rng.uniform(0.6, 1.2)),
        # Older bone is less dense (lower contrast), and the aortic knuckle grows with age.
        bone_contrast=float(1.15 - 0.5 * age_fraction + rng.uniform(-0.08, 0.08)),
        aortic_radius=float(0.035 + 0.045 * age_fraction + rng.uniform(0.0, 0.01)),
        effusion=effusion,
        # From a blunted costophrenic angle (the fluid only in the lateral corner, 3-4 px at
        # 64 px) to a moderate effusion; partly aerated (opacity < 1) so its contrast varies.
        # The earlier 0.35-0.60 at full opacity was a large white band that random-init
        # features and a pixel probe both detected at AUROC 0.99 (issue 23).
        effusion_level=float(rng.uniform(0.08, 0.30)),
        effusion_rise=float(rng.uniform(0.06, 0.24)),
        effusion_opacity=float(rng.uniform(0.45, 0.95)),
        # Hemidiaphragm heights vary in everyone (a raised dome whitens the same lung base an
        # effusion does, with the dome's convex shape instead of the fluid's meniscus).
        dome_shift=(float(rng.uniform(-0.14, 0.04)), float(rng.uniform(-0.14, 0.04))),
        nodules=(),
    )
    params = PhantomParams(**patient, **_sample_acquisition(rng, base_size, acquisition))
    if nodule:
        count = int(rng.integers(1, 4))
        params = dataclasses.replace(params, nodules=_sample_nodules(rng, params, count))
    return params


def sample_followup(
    rng: np.random.Generator,
    params: PhantomParams,
    base_size: int = 256,
    acquisition: str = "standard",
) -> PhantomParams:
    """Another study of the same patient: same anatomy and findings, new acquisition."""
    return dataclasses.replace(params, **_sample_acquisition(rng, base_size, acquisition))


def _sample_nodules(
    rng: np.random.Generator, params: PhantomParams, count: int
) -> tuple[Nodule, ...]:
    """Rejection-sample `count` non-overlapping nodules lying wholly inside a lung field,
    clear of the heart, the diaphragm and any effusion."""
    nodules: list[Nodule] = []
    angles = np.linspace(0.0, 2 * np.pi, 12, endpoint=False)
    for _ in range(2000):
        if len(nodules) == count:
            break
        side = rng.choice([-1.0, 1.0])
        # Sized and dense enough to be seen at the demo's 112 px (a nodule covers >= ~2x2
        # patches of 16 px); the earlier 0.035-0.075 / 0.10-0.20 were at chance even for a
        # pixel-level detector at that resolution.
        radius = float(rng.uniform(0.08, 0.13))
        x = side * float(rng.uniform(0.15, 0.75))
        y = float(rng.uniform(-0.7, 0.6))
        probe_x = np.concatenate([[x], x + 1.3 * radius * np.cos(angles)])
        probe_y = np.concatenate([[y], y + 1.3 * radius * np.sin(angles)])
        fields = _lung_fields(probe_x, probe_y, params)
        if np.min(fields["lung"]) < 0.95 or np.max(fields["effusion"]) > 0.05:
            continue
        if any(math.hypot(x - n.x, y - n.y) < 1.5 * (radius + n.radius) for n in nodules):
            continue
        nodules.append(Nodule(x=x, y=y, radius=radius, contrast=float(rng.uniform(0.25, 0.40))))
    if len(nodules) < count and not nodules:
        raise RuntimeError("could not place a nodule inside the lung fields")
    return tuple(nodules)


# --------------------------------------------------------------------------------------------
# Geometry (vectorised over points in canonical thorax units)


def _soft_inside(signed: np.ndarray, width: float) -> np.ndarray:
    """Smooth indicator of `signed > 0` with a transition `width` wide (tanh edge)."""
    return 0.5 * (1.0 + np.tanh(signed / width))


def _ellipse(x, y, cx, cy, ax, ay, width=0.02) -> np.ndarray:
    """Soft indicator of the ellipse centred (cx, cy) with semi-axes (ax, ay)."""
    radius = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return _soft_inside((1.0 - radius) * min(ax, ay), width)


def _dome_y(x: np.ndarray, side: float, params: PhantomParams) -> np.ndarray:
    """y of the diaphragm dome under one lung; the right (image-left) dome sits higher."""
    centre_x = side * _LUNG_CENTRE_X * params.lung_width
    half_width = _LUNG_HALF_WIDTH * params.lung_width
    t = np.clip((x - centre_x) / half_width, -1.0, 1.0)
    return _dome_base_y(side, params) - _DOME_HEIGHT * (1.0 - t**2)


def _dome_base_y(side: float, params: PhantomParams) -> float:
    """y of the dome's lateral end (costophrenic angle) under one lung; the right
    (image-left, side < 0) dome sits higher, and each side moves by the patient's
    dome_shift."""
    right_is_higher = -0.04 if side < 0 else 0.0
    shift = params.dome_shift[0 if side < 0 else 1]
    return _LUNG_CENTRE_Y + _DOME_BASE_OFFSET + right_is_higher + shift


def _heart(x: np.ndarray, y: np.ndarray, params: PhantomParams) -> np.ndarray:
    """Soft heart silhouette: an ellipse left of the midline (image right)."""
    s = params.heart_scale
    return _ellipse(x, y, 0.08 * s, 0.24, 0.29 * s, 0.23 * s, width=0.015)


def _aortic_knuckle(x: np.ndarray, y: np.ndarray, params: PhantomParams) -> np.ndarray:
    """Soft aortic arch knuckle at the upper left mediastinal border (image right)."""
    r = params.aortic_radius
    return _ellipse(x, y, _MEDIASTINUM_HALF_WIDTH + 0.3 * r, -0.30, r, r, width=0.012)


def _lung_fields(x: np.ndarray, y: np.ndarray, params: PhantomParams) -> dict[str, np.ndarray]:
    """Soft masks in canonical units: 'lung' (aerated lung before effusion), 'effusion'
    (fluid inside the lung outline of the affected side), one value per point."""
    lung = np.zeros_like(x, dtype=np.float64)
    effusion = np.zeros_like(x, dtype=np.float64)
    half_width = _LUNG_HALF_WIDTH * params.lung_width
    for side in (-1.0, 1.0):
        centre_x = side * _LUNG_CENTRE_X * params.lung_width
        outline = _ellipse(x, y, centre_x, _LUNG_CENTRE_Y, half_width, _LUNG_HALF_HEIGHT)
        above_dome = _soft_inside(_dome_y(x, side, params) - y, 0.012)
        lateral_of_mediastinum = _soft_inside(side * x - _MEDIASTINUM_HALF_WIDTH, 0.015)
        field = outline * above_dome * lateral_of_mediastinum
        lung = lung + field
        affected = (side < 0 and params.effusion == EFFUSION_RIGHT) or (
            side > 0 and params.effusion == EFFUSION_LEFT
        )
        if affected:
            # Meniscus: fluid surface rises towards the chest wall, filling the
            # costophrenic angle (blunting it).
            lateral = np.clip((side * x - (abs(centre_x) - half_width)) / (2 * half_width), 0, 1)
            lateral_dome_y = _dome_base_y(side, params)
            surface = lateral_dome_y - params.effusion_level - params.effusion_rise * lateral**2
            effusion = effusion + field * _soft_inside(y - surface, 0.012)
    cardiac = np.maximum(_heart(x, y, params), _aortic_knuckle(x, y, params))
    lung = lung * (1.0 - cardiac)
    effusion = effusion * (1.0 - cardiac)
    return {"lung": np.clip(lung, 0, 1), "effusion": np.clip(effusion, 0, 1)}


def _canonical_grid(params: PhantomParams) -> tuple[np.ndarray, np.ndarray]:
    """Canonical thorax coordinates (x, y), each [H, W], of every pixel centre after the
    patient's shift, rotation and thorax scale (isotropic: one unit = half the width)."""
    half = params.width / 2.0
    cols = (np.arange(params.width) + 0.5 - half) / half
    rows = (np.arange(params.height) + 0.5 - params.height / 2.0) / half
    image_x, image_y = np.meshgrid(cols, rows)
    theta = np.deg2rad(params.rotation_deg)
    dx, dy = image_x - params.shift_x, image_y - params.shift_y
    x = (np.cos(theta) * dx + np.sin(theta) * dy) / params.thorax_scale
    y = (-np.sin(theta) * dx + np.cos(theta) * dy) / params.thorax_scale
    return x, y + _IMAGE_CENTRE_Y


def _nodule_density(x: np.ndarray, y: np.ndarray, nodules: Sequence[Nodule]) -> np.ndarray:
    """Summed density of the nodules: dome-shaped profile with a soft rim."""
    density = np.zeros_like(x)
    for n in nodules:
        distance = np.hypot(x - n.x, y - n.y)
        profile = np.sqrt(np.clip(1.0 - (distance / n.radius) ** 2, 0.0, 1.0))
        density += n.contrast * (0.6 * profile + 0.4 * _soft_inside(n.radius - distance, 0.006))
    return density


def lesion_masks(params: PhantomParams) -> tuple[np.ndarray, np.ndarray]:
    """Boolean [H, W] masks (nodules, effusion) on the image pixel grid."""
    x, y = _canonical_grid(params)
    nodules = np.zeros(x.shape, dtype=bool)
    for n in params.nodules:
        nodules |= np.hypot(x - n.x, y - n.y) <= n.radius
    # Fluid a quarter as thick as full already shows (it can lie as a thin layer on the dome).
    effusion = _lung_fields(x, y, params)["effusion"] > 0.25
    return nodules, effusion


# --------------------------------------------------------------------------------------------
# Rendering


_RIB_COUNT = 10
_FIRST_RIB_Y = -0.78
_RIB_SPACING = 0.135


def _nearest_band(y: np.ndarray, centre_of_first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For bands at centre_of_first + k * spacing (k = 0..9): the nearest band's index k
    and the signed distance to it, per point (one pass instead of a loop over ribs)."""
    phase = (y - centre_of_first) / _RIB_SPACING
    index = np.clip(np.rint(phase), 0, _RIB_COUNT - 1)
    return index, (phase - index) * _RIB_SPACING


def _ribs(x: np.ndarray, y: np.ndarray, torso: np.ndarray) -> np.ndarray:
    """Posterior ribs (curved bands falling laterally) plus fainter anterior ribs."""
    ax = np.abs(x)
    lateral = np.clip(ax / 0.85, 0.0, 1.0)
    along = _soft_inside(ax - 0.07, 0.02) * _soft_inside(0.86 - ax, 0.04) * torso
    posterior_first = _FIRST_RIB_Y - 0.09 * np.sin(np.pi * lateral) + 0.16 * lateral**2
    index, distance = _nearest_band(y, posterior_first)
    thickness = 0.022 + 0.004 * index / (_RIB_COUNT - 1)  # lower ribs are broader
    density = np.exp(-((distance / thickness) ** 2))
    # Anterior ribs fall towards the sternum and fade medially.
    _, distance = _nearest_band(y, _FIRST_RIB_Y + 0.22 * (1.0 - lateral))
    anterior_band = np.exp(-((distance / 0.02) ** 2))
    density += 0.35 * anterior_band * _soft_inside(lateral - 0.35, 0.05)
    return density * along


def _clavicles(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Two S-curved bands from the sternal notch out to the shoulders."""
    ax = np.abs(x)
    centre = -0.70 - 0.18 * (ax - 0.08) + 0.04 * np.sin(np.pi * np.clip((ax - 0.08) / 0.6, 0, 1))
    extent = _soft_inside(ax - 0.08, 0.02) * _soft_inside(0.70 - ax, 0.03)
    return np.exp(-(((y - centre) / 0.03) ** 2)) * extent


def _spine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Midline vertebral column with vertebral bodies every 0.14 units."""
    column = _soft_inside(0.075 - np.abs(x), 0.012)
    bodies = 0.75 + 0.25 * np.cos(2 * np.pi * (y + 1.0) / 0.14)
    return column * bodies


def _anatomy_density(
    x: np.ndarray, y: np.ndarray, params: PhantomParams
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free, pose-applied density map [H, W] before any exposure mapping, and the
    aerated-lung soft mask [H, W] (where lung texture belongs)."""
    torso_shape = (np.abs(x) / 0.97) ** 4 + (np.abs(y - 0.25) / 1.25) ** 4
    torso = _soft_inside(1.0 - torso_shape, 0.08)
    neck = _soft_inside(0.30 - np.abs(x), 0.04) * _soft_inside(-0.6 - y, 0.05)
    body = np.maximum(torso, neck)
    fields = _lung_fields(x, y, params)
    fluid = params.effusion_opacity * fields["effusion"]
    aerated = fields["lung"] * (1.0 - fluid)
    hilum = sum(np.exp(-((x - side * 0.22) ** 2 + (y + 0.02) ** 2) / 0.012) for side in (-1.0, 1.0))
    density = 0.46 * body
    density -= 0.30 * aerated * (1.0 - 0.35 * np.clip(hilum, 0, 1))
    density += 0.12 * fluid * fields["lung"]
    density += 0.06 * _heart(x, y, params) + 0.05 * _aortic_knuckle(x, y, params)
    abdomen = sum(_soft_inside(y - _dome_y(x, side, params), 0.012) for side in (-1.0, 1.0))
    density += 0.04 * np.clip(abdomen, 0, 1) * torso
    if params.breast_size > 0:
        for side in (-1.0, 1.0):
            breast = _ellipse(x, y, side * 0.46, 0.40, 0.30, 0.20 * params.breast_size, 0.03)
            density += 0.09 * params.breast_size * breast * _soft_inside(y - 0.30, 0.05)
    bone = params.bone_contrast
    density += bone * (0.09 * _ribs(x, y, torso) + 0.16 * _clavicles(x, y))
    density += bone * 0.14 * _spine(x, y) * body
    density += _nodule_density(x, y, params.nodules)
    return density, aerated


def _lung_texture(rng: np.random.Generator, params: PhantomParams) -> np.ndarray:
    """Smooth random texture [H, W] with unit std, standing in for vascular markings (it
    makes nodule detection harder than finding the only blob in a flat lung)."""
    white = rng.normal(0.0, 1.0, size=(params.height, params.width))
    smooth = ndimage.gaussian_filter(white, 2.0 * params.width / 256.0, mode="wrap")
    return smooth / max(float(smooth.std()), 1e-12)


def render_phantom(
    rng: np.random.Generator, params: PhantomParams
) -> tuple[np.ndarray, np.ndarray]:
    """Render one chest radiograph phantom.

    Returns (image, mask): image float32 [H, W] in [0, 1] with bright = dense (the
    MONOCHROME2 look), mask uint8 [H, W] with 255 on nodule and effusion pixels. The only
    randomness used here is the lung texture and the quantum noise drawn from `rng`.
    """
    x, y = _canonical_grid(params)
    density, aerated = _anatomy_density(x, y, params)
    density = density + _LUNG_TEXTURE * aerated * _lung_texture(rng, params)
    density = np.clip(density, 0.0, None)
    exposure = params.gain * np.power(density, params.gamma) + params.offset
    exposure += params.tilt * (np.arange(params.height)[:, None] / params.height - 0.5)
    exposure = ndimage.gaussian_filter(exposure, params.blur_sigma, mode="nearest")
    exposure += rng.normal(0.0, params.noise_sigma, size=exposure.shape)
    image = np.clip(exposure, 0.0, 1.0).astype(np.float32)
    nodules, effusion = lesion_masks(params)
    mask = np.where(nodules | effusion, 255, 0).astype(np.uint8)
    return image, mask
