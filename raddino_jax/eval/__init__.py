"""Evaluation on frozen features (recipe s10).

features.py: dataset images -> cached uint8 crops -> jitted teacher features; labels, splits.
splits.py: train / val / test roles by patient (a missing val / test split carved from train).
knn.py: weighted kNN (cosine, T = 0.07, k in {10, 20, 100, 200}).
linear.py: logistic-regression probe (optax L-BFGS, C chosen on validation) and the metrics
  (scikit-learn's, NaN where undefined).
metadata.py: RAD-DINO's sex (AUROC) and age (scikit-learn ridge: MAE, R^2) probes.
segmentation.py: linear probe on patch tokens against lesion masks (Dice).
report.py: eval.json / eval.md, and the score differences between models.
hook.py: `KnnEvaluator`, the periodic kNN evaluation for the training loop.
The CLI is `python -m raddino_jax.evaluate`.
"""
