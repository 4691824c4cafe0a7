"""Dataset adapters: a public chest-radiograph dataset's own metadata -> `ImageRecord`s.

One module per dataset family (its docstring states the layout it reads and where that layout
was checked); `data_prep.manifest` turns their output into a manifest CSV for data_prep.build.
"""

from __future__ import annotations

from collections.abc import Callable

from etils import epath

from data_prep.adapters import brax, chexpert, common, mimic, nih, padchest

Loader = Callable[..., common.AdapterOutput]

# dataset name -> loader (MIMIC loaders also take labeler / metadata_dir, BRAX image_column)
DATASETS: dict[str, Loader] = {
    "mimic-cxr": mimic.load_dicom,
    "mimic-cxr-jpg": mimic.load_jpg,
    "chexpert": chexpert.load,
    "chexpert-small": chexpert.load,
    "nih-cxr14": nih.load,
    "padchest": padchest.load,
    "brax": brax.load,
}
MIMIC = ("mimic-cxr", "mimic-cxr-jpg")
KEEP_LABELS = common.LabelPolicy()


def load(
    dataset: str,
    root: epath.PathLike,
    policy: common.LabelPolicy = KEEP_LABELS,
    labeler: str = "chexpert",
    metadata_dir: epath.PathLike | None = None,
    brax_images: str = "PngPath",
) -> common.AdapterOutput:
    """Run the adapter of `dataset` over `root` with the options that dataset takes."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; one of {sorted(DATASETS)}")
    root = epath.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a folder")
    if dataset in MIMIC:
        extra = epath.Path(metadata_dir) if metadata_dir else None
        return DATASETS[dataset](root, policy, labeler=labeler, metadata_dir=extra)
    if dataset == "brax":
        return brax.load(root, policy, image_column=brax_images)
    return DATASETS[dataset](root, policy)
