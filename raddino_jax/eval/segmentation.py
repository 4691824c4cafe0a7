"""Patch-level linear segmentation probe: do the patch tokens know where the lesion is?

For data with lesion masks (the phantoms' nodules and effusions), each mask is brought to the
network's input geometry (features.crop_mask) and averaged over each patch, giving the lesion
fraction of every patch [N, h, w]. The patch target is lesion presence (fraction > 0: the
phantoms' lesions cover a few percent of the image, rarely half a 14 px patch). A logistic
probe on the standardised patch tokens predicts it; C is chosen on the validation split by
patch-level Dice.

Reported on the test split, Dice pooled over all test patches / pixels:
- `dice_patch`: predicted probability >= 0.5 against lesion presence;
- `dice_pixel`: the predicted patch map upsampled (nearest, patch-sized blocks) against the
  pixel mask; `dice_pixel_ceiling` is the same for the true presence map (what a perfect
  patch-level probe would score at pixel level);
- under `patch_tokens`, and the same under `cls_position` for a control probe that sees only
  the image's CLS token plus a one-hot patch position: if the patch tokens beat it, the
  localisation is in the patch tokens and not only in the image-level summary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raddino_jax.eval.linear import DEFAULT_C_GRID, LogisticModel, Standardizer, fit_logistic

# Coarser than the image-level grid: patch problems have h*w times more rows.
SEGMENTATION_C_GRID = DEFAULT_C_GRID[::2]
THRESHOLD = 0.5


def patch_fractions(masks: np.ndarray, patch_size: int) -> np.ndarray:
    """Bool masks [N, S, S] -> lesion fraction per patch, float32 [N, S/p, S/p]."""
    n, height, width = masks.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"mask size {height}x{width} is not a multiple of patch {patch_size}")
    blocks = masks.reshape(n, height // patch_size, patch_size, width // patch_size, patch_size)
    return blocks.mean(axis=(2, 4), dtype=np.float64).astype(np.float32)


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    """2 |P & T| / (|P| + |T|) over all elements; NaN when both are empty."""
    prediction, target = np.asarray(prediction, bool), np.asarray(target, bool)
    denominator = int(prediction.sum()) + int(target.sum())
    if denominator == 0:
        return float("nan")
    return float(2.0 * np.logical_and(prediction, target).sum() / denominator)


def upsample_patches(values: np.ndarray, patch_size: int) -> np.ndarray:
    """[N, h, w] -> [N, h*p, w*p], each patch value repeated over its p x p pixels."""
    return np.repeat(np.repeat(values, patch_size, axis=1), patch_size, axis=2)


def _rows(tokens: np.ndarray) -> np.ndarray:
    """[N, h, w, D] -> [N*h*w, D]."""
    return tokens.reshape(-1, tokens.shape[-1])


def cls_position_features(cls: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Control features: CLS [N, D] broadcast to every patch, plus one-hot position.

    Returns [N, h, w, D + h*w].
    """
    n, d = cls.shape
    h, w = grid
    position = np.eye(h * w, dtype=np.float32).reshape(h, w, h * w)
    cls_part = np.broadcast_to(cls[:, None, None, :], (n, h, w, d))
    return np.concatenate([cls_part, np.broadcast_to(position[None], (n, h, w, h * w))], axis=-1)


def _fit_selected(
    train_tokens: np.ndarray,
    train_presence: np.ndarray,
    val_tokens: np.ndarray,
    val_presence: np.ndarray,
    c_grid: Sequence[float],
) -> LogisticModel:
    """Sweep C (warm-started) on train patches, pick by validation patch Dice (then -log-loss,
    then smaller C); the final probe is refitted on train + validation patches.

    tokens: [N, h, w, F]; presence: bool [N, h, w].
    """
    x_train, y_train = _rows(train_tokens), train_presence.reshape(-1).astype(np.float32)
    x_val, y_val = _rows(val_tokens), val_presence.reshape(-1).astype(np.float32)
    standardizer = Standardizer.fit(x_train)
    best, init = None, None
    for c in sorted(c_grid):
        model = fit_logistic(
            x_train, y_train, 2, c, init=init, standardizer=standardizer,
            min_rows=len(x_train) + len(x_val),
        )
        init = (model.weights, model.bias)
        probability = np.clip(model.probabilities(x_val)[:, 1], 1e-12, 1 - 1e-12)
        val_dice = dice(probability >= THRESHOLD, y_val > 0)
        neg_loss = float(
            np.mean(y_val * np.log(probability) + (1 - y_val) * np.log1p(-probability))
        )
        key = (-1.0 if np.isnan(val_dice) else val_dice, neg_loss)
        if best is None or key > best[0]:
            best = (key, c, model)
    _, best_c, model = best
    x_all, y_all = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    return fit_logistic(x_all, y_all, 2, best_c, init=(model.weights, model.bias))


def _test_dice(
    model: LogisticModel, tokens: np.ndarray, masks: np.ndarray, patch_size: int
) -> dict[str, float]:
    """Patch- and pixel-level Dice of `model` on test tokens [N, h, w, D] and masks [N, S, S]."""
    n, h, w, _ = tokens.shape
    predicted = model.probabilities(_rows(tokens))[:, 1].reshape(n, h, w) >= THRESHOLD
    return {
        "dice_patch": dice(predicted, patch_fractions(masks, patch_size) > 0),
        "dice_pixel": dice(upsample_patches(predicted, patch_size), masks),
        "c": model.c,
    }


def segmentation_probe(
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    patch_size: int,
    c_grid: Sequence[float] = SEGMENTATION_C_GRID,
) -> dict[str, float]:
    """Linear patch probe and its CLS + position control.

    Each argument is (patch tokens [N, h, w, D], CLS [N, D], masks bool [N, S, S]).
    Returns Dice of both probes (see the module docstring) and the test lesion prevalence.
    """
    presence = [patch_fractions(part[2], patch_size) > 0 for part in (train, val, test)]
    if not presence[0].any() or presence[0].all():
        return {"skipped": "training patches need both lesion and background"}
    patch_model = _fit_selected(train[0], presence[0], val[0], presence[1], c_grid)
    result = {"patch_tokens": _test_dice(patch_model, test[0], test[2], patch_size)}
    grid = train[0].shape[1:3]
    control = [cls_position_features(part[1], grid) for part in (train, val, test)]
    control_model = _fit_selected(control[0], presence[0], control[1], presence[1], c_grid)
    result["cls_position"] = _test_dice(control_model, control[2], test[2], patch_size)
    result["dice_pixel_ceiling"] = dice(upsample_patches(presence[2], patch_size), test[2])
    result["test_lesion_patch_share"] = float(np.mean(presence[2]))
    result["n_test"] = int(len(test[0]))
    return result
