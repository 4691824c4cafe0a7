"""Percentile bootstrap confidence intervals for kNN accuracy and probe AUROC, paired by model.

The test examples are resampled with replacement `n_resamples` times (a seeded
`np.random.default_rng`); one resample set is drawn per (seed, label) and shared by every
model evaluated on that label's test examples, so the interval of a difference between two
models is the paired one (both scored on the same resampled examples). The interval is the
(2.5, 97.5) percentile of the resampled statistic; resamples where a statistic is undefined (one
class only, for AUROC) are left out.

AUROC is computed for all resamples at once from mid-ranks (the Mann-Whitney U statistic, ties
count one half), equal to `sklearn.metrics.roc_auc_score`; multi-class labels use the macro
one-vs-rest mean over the classes present, like `linear.classification_metrics`.
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy import stats

N_RESAMPLES = 1000
LEVEL = 0.95


def resample_indices(n: int, n_resamples: int = N_RESAMPLES, seed: int = 0, key: str = ""):
    """[n_resamples, n] int indices drawn with replacement; a pure function of (seed, key, n)."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode()), n])
    return rng.integers(0, n, size=(n_resamples, n))


def interval(samples: np.ndarray, level: float = LEVEL) -> list[float]:
    """[low, high] percentile interval of the finite `samples`; [nan, nan] if none."""
    samples = np.asarray(samples, np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [float("nan"), float("nan")]
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return [float(low), float(high)]


def accuracy_samples(correct: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Accuracy of each resample: `correct` [N] (0/1) -> [R]."""
    return np.asarray(correct, np.float64)[indices].mean(axis=1)


def balanced_accuracy_samples(
    labels: np.ndarray, predicted: np.ndarray, indices: np.ndarray
) -> np.ndarray:
    """Balanced accuracy (mean per-class recall over the classes present) of each resample:
    labels, predicted [N] int -> [R]. Equal to sklearn's balanced_accuracy_score per row."""
    labels = np.asarray(labels)[indices]
    correct = (np.asarray(predicted)[indices] == labels).astype(np.float64)
    recalls, present = [], []
    for c in np.unique(labels):
        members = labels == c
        count = members.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(count > 0, (correct * members).sum(axis=1) / count, 0.0))
        present.append(count > 0)
    recalls, present = np.stack(recalls, axis=1), np.stack(present, axis=1)
    return recalls.sum(axis=1) / present.sum(axis=1)


def _binary_auroc_rows(positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each row: positive [R, N] bool, scores [R, N] -> [R] (NaN: one class only)."""
    ranks = stats.rankdata(scores, axis=1)  # mid-ranks for ties
    n_pos = positive.sum(axis=1).astype(np.float64)
    n_neg = positive.shape[1] - n_pos
    rank_sum = np.where(positive, ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def auroc_samples(labels: np.ndarray, probabilities: np.ndarray, indices: np.ndarray):
    """AUROC of each resample: labels [N] int, probabilities [N, K] -> [R].

    K == 2: AUROC of class 1. K > 2: mean one-vs-rest AUROC over the classes that have both
    positives and negatives in the resample (NaN if none).
    """
    labels = np.asarray(labels)[indices]
    probabilities = np.asarray(probabilities, np.float64)[indices]  # [R, N, K]
    if probabilities.shape[-1] == 2:
        return _binary_auroc_rows(labels == 1, probabilities[..., 1])
    classes = range(probabilities.shape[-1])
    per_class = np.stack(
        [_binary_auroc_rows(labels == c, probabilities[..., c]) for c in classes], axis=1
    )
    defined = np.isfinite(per_class)
    with np.errstate(invalid="ignore"):
        return np.where(defined.any(axis=1), np.nansum(per_class, 1) / defined.sum(1), np.nan)
