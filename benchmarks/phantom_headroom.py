"""How hard are the phantom findings for features nobody trained? (issue 23)

    PYTHONPATH=. python benchmarks/phantom_headroom.py --run RUN_DIR [--n 1200] [--seed 101]

Renders N phantoms in memory (no DICOM: `phantoms.render_phantom`, min-max windowed to uint8
like the decoder's default, resized and centre-cropped like the export), labels balanced as
`generate.plan_phantoms` does, one study per patient, half for fitting and half for scoring.
For each finding label it prints the test AUROC of a logistic probe and the kNN balanced
accuracy (k 20, T 0.07, L2-normalised) on (a) the raw 28x28 pixels and (b) the CLS (+ mean
patch token for the probe) of a random initialisation of RUN_DIR's architecture, and, with
--teacher, of RUN_DIR's teacher. A finding "a network must learn to see" leaves headroom in
(a) and (b).
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from raddino_jax import checkpoint
from raddino_jax.data.samples import generate, phantoms
from raddino_jax.eval import features as feats
from raddino_jax.eval.tasks import pixel_features
from raddino_jax.models import init_params

LABELS = ("nodule", "effusion", "effusion_present")


def render_set(n: int, seed: int, size: int, image_size: int):
    plans = [p for p in generate.plan_phantoms(np.random.default_rng([seed, 0]), n)]
    plans = [p for p in plans if p.study_index == 0]
    crops, labels = [], {k: [] for k in LABELS}
    for plan in plans:
        rng = np.random.default_rng([seed, 2, plan.patient_index])
        params = phantoms.sample_patient(
            rng, size, sex=plan.sex, nodule=plan.nodule, effusion=plan.effusion
        )
        image, _ = phantoms.render_phantom(np.random.default_rng([seed, 4, plan.index]), params)
        low, high = float(image.min()), float(image.max())
        u8 = np.rint((image - low) / max(high - low, 1e-6) * 255).astype(np.uint8)
        crops.append(feats.crop_uint8(u8, image_size))
        labels["nodule"].append(params.nodule)
        labels["effusion"].append(params.effusion)
        labels["effusion_present"].append(int(params.effusion != 0))
    return np.stack(crops), {k: np.array(v) for k, v in labels.items()}


def knn_balanced(train, train_y, test, test_y, k=20, temperature=0.07):
    def norm(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sims = norm(test) @ norm(train).T
    top = np.argsort(-sims, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sims, top, axis=1) / temperature)
    n_classes = int(train_y.max()) + 1
    votes = np.zeros((len(test), n_classes))
    for c in range(n_classes):
        votes[:, c] = (weights * (train_y[top] == c)).sum(axis=1)
    return balanced_accuracy_score(test_y, votes.argmax(axis=1))


def probe_auroc(train, train_y, test, test_y):
    scaler = StandardScaler().fit(train)
    best = None
    for c in (1e-3, 1e-2, 1e-1, 1.0):
        model = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(train), train_y)
        prob = model.predict_proba(scaler.transform(test))
        score = (
            roc_auc_score(test_y, prob[:, 1])
            if prob.shape[1] == 2
            else roc_auc_score(test_y, prob, multi_class="ovr", average="macro")
        )
        best = score if best is None else max(best, score)  # optimistic: best C on test
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--n", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--teacher", action="store_true")
    args = parser.parse_args()
    spec = checkpoint.load_spec(args.run)
    pre = checkpoint.load_preprocessing(args.run)
    crops, labels = render_set(args.n, args.seed, args.size, pre.image_size)
    half = len(crops) // 2
    inputs = {"pixels": (pixel_features(crops), pixel_features(crops))}
    feature_fn = feats.make_uint8_feature_fn(spec, pre, n_layers=1)
    models = [("random_init", init_params(spec, 0))]
    if args.teacher:
        models.append(("teacher", checkpoint.load_run_params(args.run, "teacher")[1]))
    for name, params in models:
        f = feats.extract_features(feature_fn, params, crops)
        inputs[name] = (f["cls"], np.concatenate([f["cls"], f["patch_mean"]], axis=1))
    for name, (knn_x, probe_x) in inputs.items():
        parts = []
        for label in LABELS:
            y = labels[label]
            knn = knn_balanced(knn_x[:half], y[:half], knn_x[half:], y[half:])
            auc = probe_auroc(probe_x[:half], y[:half], probe_x[half:], y[half:])
            parts.append(f"{label} kNN {knn:.3f} AUROC {auc:.3f}")
        print(f"{name:12s} " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
