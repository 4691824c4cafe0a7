"""`python -m raddino_jax.extract`: frozen features of a checkpoint for images or arrays.

  python -m raddino_jax.extract --checkpoint PATH --input X --out F.npz [--layers N]

X is a `.npy` array of already-preprocessed images (N, H, W, 3) float32, a folder of DICOM /
PNG / JPEG files (recursive), a `.txt` list of such paths, or a single file. Files get the
inference preprocessing of the checkpoint (`data.preprocess`, identical to the exported
preprocessor_config.json). Writes `cls` (N, D), `patch` (N, h, w, D), with `--layers N` also
`layers_cls` (N, L, D) and `layers_patch` (N, L, h, w, D) (normed outputs of the last N blocks,
like dinov2's get_intermediate_layers), and `paths` for file inputs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np
from etils import epath

from raddino_jax import checkpoint
from raddino_jax.eval.features import make_feature_fn


def list_image_files(path: str | epath.Path) -> list[str]:
    """A folder (recursive), a .txt list, or a single image file -> sorted image paths."""
    from raddino_jax.data.builder.inputs import scan_directory
    from raddino_jax.data.decode import classify_file

    path = epath.Path(path)
    if path.is_dir():
        items, _ = scan_directory(path)
        return [item.path for item in items]
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if classify_file(path) is None:
        raise ValueError(f"{path}: expected a .npy array, a folder, a .txt list or an image file")
    return [str(path)]


def iter_batches(
    source: str | epath.Path, pre: checkpoint.Preprocessing, batch_size: int
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(images [b, S, S, 3] float32, paths) batches from any supported input."""
    from raddino_jax.data.preprocess import load_image_uint8, preprocess_uint8

    source = epath.Path(source)
    if source.suffix == ".npy":
        with source.open("rb") as handle:
            array = np.load(handle)
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(
                f"{source}: expected (N, H, W, 3) preprocessed images, got {array.shape}"
            )
        for start in range(0, len(array), batch_size):
            yield array[start : start + batch_size].astype(np.float32), []
        return
    paths = list_image_files(source)
    if not paths:
        raise ValueError(f"{source}: no DICOM / PNG / JPEG files found")
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        yield np.stack([preprocess_uint8(load_image_uint8(p), pre) for p in chunk]), chunk


def extract_features(
    checkpoint_path: str,
    source: str,
    *,
    n_layers: int = 0,
    batch_size: int = 16,
    which: str = "teacher",
) -> dict[str, np.ndarray]:
    """Features of every input image, stacked along the first axis."""
    spec, params = checkpoint.load_any_params(checkpoint_path, which=which)
    pre = checkpoint.load_preprocessing(checkpoint_path)
    features = make_feature_fn(spec, n_layers)
    parts: dict[str, list[np.ndarray]] = {}
    paths: list[str] = []
    for images, batch_paths in iter_batches(source, pre, batch_size):
        for key, value in features(params, jnp.asarray(images)).items():
            parts.setdefault(key, []).append(np.asarray(value))
        paths.extend(batch_paths)
    result = {key: np.concatenate(value) for key, value in parts.items()}
    if paths:
        result["paths"] = np.asarray(paths)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raddino_jax.extract",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="params checkpoint or training run dir")
    parser.add_argument("--input", required=True, help=".npy, folder, .txt list or image file")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--layers", type=int, default=0, help="also the last N blocks' outputs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--which", default="teacher", choices=["teacher", "student"])
    args = parser.parse_args(argv)
    try:
        result = extract_features(
            args.checkpoint, args.input, n_layers=args.layers, batch_size=args.batch_size,
            which=args.which,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = epath.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as handle:
        np.savez(handle, **result)
    shapes = ", ".join(f"{k} {v.shape}" for k, v in result.items())
    print(f"wrote {out}: {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
