"""Tests for raddino_jax.data.mixture: weighted mixtures of record sources, and the per-source
ids the pipeline carries in its batches."""

import cv2
import numpy as np
import pytest

from raddino_jax.data import layout, mixture, pipeline
from raddino_jax.data.augment import MultiCropConfig

CFG = MultiCropConfig(global_size=28, local_size=14, n_local=2)


def _id_source(first: int, n: int) -> list[dict]:
    """Records that only say who they are (the record streams never decode them)."""
    return [{"id": first + i} for i in range(n)]


def _png_source(first: int, n: int, seed: int) -> list[dict]:
    """Decodable records whose id says which source they belong to (id // 1000)."""
    rng = np.random.default_rng(seed)
    return [
        {
            "image": cv2.imencode(".png", rng.integers(0, 256, (40, 34), np.uint8))[1].tobytes(),
            "id": first + i,
        }  # fmt: skip
        for i in range(n)
    ]


def _mixture(weights=(0.8, 0.2), sizes=(20, 7)) -> mixture.Mixture:
    sources = tuple(_id_source(1000 * i, n) for i, n in enumerate(sizes))
    return mixture.Mixture(sources, tuple(weights), tuple(f"s{i}" for i in range(len(sizes))))


def _true_sources(records) -> np.ndarray:
    """Each record's source, from its id (not from the tag the mixture adds)."""
    return np.array([r["id"] // 1000 for r in records])


def test_mixture_counts_are_within_binomial_noise_of_the_weights():
    mix, n = _mixture(), 2000
    records = pipeline.shard(mixture.record_stream(mix, 3), 0, 1)
    ids = _true_sources(records[i] for i in range(n))
    counts = np.bincount(ids, minlength=2)
    sigma = np.sqrt(n * 0.8 * 0.2)
    assert abs(counts[1] - 0.2 * n) < 3 * sigma, counts
    # Every source is read in whole epochs of its own: in the first window the small source's
    # 7 records appear equally often (to within one epoch).
    window = [records[i]["id"] for i in range(mixture.MIX_WINDOW)]
    small = np.bincount([i - 1000 for i in window if i >= 1000], minlength=7)
    assert small.min() > 0 and small.max() - small.min() <= 1, small
    # The window shuffle spreads the sources over processes whose stride matches the
    # interleaving period (4:1 -> every 5th position): each of 5 processes gets about 20%.
    for p in range(5):
        shard_records = pipeline.shard(mixture.record_stream(mix, 3), p, 5)
        share = _true_sources(shard_records[i] for i in range(400)).mean()
        assert abs(share - 0.2) < 3 * np.sqrt(0.16 / 400), (p, share)


@pytest.mark.parametrize("weights", [(0.8, 0.2), (5.0, 3.0, 2.0)])
def test_records_are_tagged_with_their_source(weights):
    stream = mixture.record_stream(_mixture(weights, sizes=(20, 7, 11)[: len(weights)]), 5)
    records = [stream[i] for i in range(mixture.MIX_WINDOW + 50)]
    tags = np.array([r[mixture.SOURCE_FIELD] for r in records])
    np.testing.assert_array_equal(tags, _true_sources(records))
    assert mixture.SOURCE_FIELD not in mixture.record_stream(_id_source(0, 5), 5)[0]


def test_mixture_weights_and_validation():
    assert mixture.mixture_weights([30, 10], ["proportional", "proportional"]) == (30.0, 10.0)
    assert mixture.mixture_weights([30, 10], [0.5, 2]) == (0.5, 2.0)
    with pytest.raises(ValueError, match="proportional"):
        mixture.mixture_weights([30, 10], ["proportional", 2.0])
    assert _mixture((0.8, 0.2)).proportions == (400, 100)
    np.testing.assert_allclose(_mixture((3.0, 1.0)).shares, [0.75, 0.25])
    with pytest.raises(ValueError, match="> 0"):
        _mixture((1.0, 0.0))
    with pytest.raises(ValueError, match="no records"):
        mixture.Mixture(([], [{"id": 0}]), (1.0, 1.0), ("a", "b"))


def _dataset(source, **overrides):
    kwargs = dict(
        seed=3,
        per_process_batch=4,
        crop_cfg=CFG,
        patch_size=7,
        mask_group_size=2,
        process_index=0,
        process_count=1,
    )
    return pipeline.make_dataset(source, **{**kwargs, **overrides})


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def test_mixture_iterator_resumes_exactly():
    """Kill and resume in the middle of a mixture: iterator state after 2 batches, restored
    into a freshly built dataset (as after a restart), gives the next batches exactly."""
    mix = mixture.Mixture(
        (_png_source(0, 12, seed=0), _png_source(1000, 5, seed=1)), (0.8, 0.2), ("a", "b")
    )
    it = iter(_dataset(mix, host_counts=True))
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = iter(_dataset(mix, host_counts=True))
    fresh.set_state(state)
    for got, want in zip(_take(fresh, 3), expected, strict=True):
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # ... and differs from the single-source stream of its first source.
    first = _take(iter(_dataset(mix.sources[0])), 1)[0]
    assert not np.array_equal(
        first["global_crops"], _take(iter(_dataset(mix)), 1)[0]["global_crops"]
    )


def test_per_source_counts_from_batch_ids_equal_the_mixture_draw():
    """Two processes' batches: each image's `source_ids` entry is the source of the record at
    its stream position, so the per-source counts the loop sums from the ids equal the counts
    of the true mixture draw over the positions the steps consumed."""
    mix = mixture.Mixture(
        (_png_source(0, 9, seed=0), _png_source(1000, 4, seed=1), _png_source(2000, 6, seed=2)),
        (5.0, 3.0, 2.0),
        ("a", "b", "c"),
    )
    steps, per_process, processes = 6, 4, 2
    stream = mixture.record_stream(mix, 3)
    counts = np.zeros(3, np.int64)
    for p in range(processes):
        dataset = _dataset(
            mix,
            per_process_batch=per_process,
            process_index=p,
            process_count=processes,
            host_counts=True,
        )
        for k, batch in enumerate(_take(iter(dataset), steps)):
            positions = [(k * per_process + j) * processes + p for j in range(per_process)]
            assert batch[layout.SOURCE_IDS].dtype == np.int32
            np.testing.assert_array_equal(
                batch[layout.SOURCE_IDS], _true_sources(stream[i] for i in positions)
            )
            counts += np.bincount(batch[layout.SOURCE_IDS], minlength=3)
    draw = _true_sources(stream[i] for i in range(steps * per_process * processes))
    np.testing.assert_array_equal(counts, np.bincount(draw, minlength=3))
    assert (counts > 0).all()
