"""Weighted k-nearest-neighbour classification on frozen features (recipe s10, dinov2 eval/knn.py).

Features are L2-normalised, similarity is the cosine. For each query the `max(ks)` (200) most
similar training examples are taken; their weights are softmax(similarity / T) over those
neighbours with T = 0.07, and the score of a class at a given k is the sum of the weights of the
first k neighbours carrying that class, normalised to sum to 1. When the training set has fewer
examples than a k, all of them are used (`effective_k` reports it).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from raddino_jax.eval.linear import accuracy, balanced_accuracy

KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
QUERY_BATCH = 256


def l2_normalise(features: jax.Array) -> jax.Array:
    """Rows divided by their L2 norm ([N, D] -> [N, D]); zero rows stay zero."""
    norm = jnp.linalg.norm(features, axis=-1, keepdims=True)
    return features / jnp.maximum(norm, 1e-12)


@functools.partial(jax.jit, static_argnames=("ks", "n_classes"))
def _knn_scores(train, train_labels, queries, temperature, *, ks, n_classes):
    """Class scores [len(ks), Q, C] of `queries` [Q, D] against `train` [N, D]."""
    similarity = l2_normalise(queries) @ l2_normalise(train).T
    top_similarity, top_index = jax.lax.top_k(similarity, max(ks))
    weights = jax.nn.softmax(top_similarity / temperature, axis=-1)
    votes = jax.nn.one_hot(train_labels[top_index], n_classes) * weights[..., None]
    scores = jnp.stack([votes[:, :k].sum(axis=1) for k in ks])
    return scores / jnp.maximum(scores.sum(axis=-1, keepdims=True), 1e-30)


def knn_class_scores(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    query_features: np.ndarray,
    n_classes: int,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
) -> dict[int, np.ndarray]:
    """k -> normalised class scores [Q, C] for every requested k.

    Args:
      train_features: [N, D]; train_labels: [N] int in [0, n_classes).
      query_features: [Q, D].
      ks: neighbour counts; a k above N is clipped to N (the scores of the requested k are
        then those of all N neighbours).
    """
    n_train = len(train_features)
    if n_train == 0:
        raise ValueError("kNN needs at least one training example")
    effective = tuple(sorted({min(k, n_train) for k in ks}))
    train = jnp.asarray(train_features, jnp.float32)
    labels = jnp.asarray(train_labels, jnp.int32)
    parts = []
    for start in range(0, len(query_features), QUERY_BATCH):
        queries = jnp.asarray(query_features[start : start + QUERY_BATCH], jnp.float32)
        scores = _knn_scores(
            train, labels, queries, jnp.float32(temperature), ks=effective, n_classes=n_classes
        )
        parts.append(np.asarray(scores))
    scores = np.concatenate(parts, axis=1) if parts else np.zeros((len(effective), 0, n_classes))
    by_effective = dict(zip(effective, scores))
    return {k: by_effective[min(k, n_train)] for k in ks}


def knn_metrics(
    scores: dict[int, np.ndarray], test_labels: np.ndarray, n_train: int
) -> dict[str, dict[str, float]]:
    """Accuracy and balanced accuracy of the arg-max class of `scores` (k -> [Q, C]) per k.

    Returns {"k10": {"accuracy", "balanced_accuracy", "effective_k"}, ...}. Predictions are the
    arg-max class (ties to the lower class index, deterministic).
    """
    result = {}
    for k, class_scores in scores.items():
        predictions = class_scores.argmax(axis=1)
        result[f"k{k}"] = {
            "accuracy": accuracy(test_labels, predictions),
            "balanced_accuracy": balanced_accuracy(test_labels, predictions),
            "effective_k": int(min(k, n_train)),
        }
    return result


def knn_evaluate(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    n_classes: int,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
) -> dict[str, dict[str, float]]:
    """Accuracy and balanced accuracy of the weighted kNN classifier for every k (`knn_metrics`)."""
    scores = knn_class_scores(
        train_features, train_labels, test_features, n_classes, ks, temperature
    )
    return knn_metrics(scores, test_labels, len(train_features))
