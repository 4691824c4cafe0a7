"""Tests for raddino_jax.data.pipeline: determinism, resumption, sharding, masks, global arrays."""

import itertools
import struct
import zlib

import cv2
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from raddino_jax.data import augment, pipeline
from raddino_jax.data.augment import MultiCropConfig
from raddino_jax.ssl import masking

CFG = MultiCropConfig(global_size=28, local_size=14, n_local=2)
PATCH = 7  # 4 x 4 mask grid on the 28 px global crops
N_TOKENS = 16
N_IMAGES = 12


def _png_source(n: int = N_IMAGES, seed: int = 0) -> list[dict]:
    """In-memory source of distinct PNG-encoded 8-bit images with an id field."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        img = cv2.GaussianBlur(rng.integers(0, 256, (40, 34)).astype(np.uint8), (0, 0), 1.0)
        records.append({"image": cv2.imencode(".png", img)[1].tobytes(), "id": i})
    return records


def _dataset(source=None, **overrides):
    kwargs = dict(
        seed=3,
        per_process_batch=4,
        crop_cfg=CFG,
        patch_size=PATCH,
        mask_group_size=2,
        process_index=0,
        process_count=1,
    )
    kwargs.update(overrides)
    return pipeline.make_dataset(_png_source() if source is None else source, **kwargs)


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_layout():
    batch = next(iter(_dataset()))
    upper = masking.mask_upper_bound(4, N_TOKENS)
    expected = {
        "global_crops": ((2, 4, 28, 28, 1), np.float32),
        "local_crops": ((2, 4, 14, 14, 1), np.float32),
        "masks": ((2, 4, N_TOKENS), np.bool_),
        "mask_indices": ((2, upper), np.int32),
        "mask_weights": ((2, upper), np.float32),
        "mask_valid": ((2, upper), np.bool_),
    }
    assert set(batch) == set(expected) == set(pipeline.IMAGE_AXIS)
    for key, (shape, dtype) in expected.items():
        assert batch[key].shape == shape, key
        assert batch[key].dtype == dtype, key
    # Normalised crops of real images: values span both sides of the mean.
    assert batch["global_crops"].min() < 0 < batch["global_crops"].max()


def test_same_seed_same_batches_different_seed_differs():
    a = _take(iter(_dataset()), 3)
    b = _take(iter(_dataset()), 3)
    c = _take(iter(_dataset(seed=4)), 3)
    _assert_batches_equal(a, b)
    for key in ("global_crops", "local_crops", "masks"):
        assert not np.array_equal(a[0][key], c[0][key])


def test_restored_iterator_continues_exactly():
    """State after 2 batches, restored into a fresh dataset; the next 3 cross an epoch end."""
    it = iter(_dataset())
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = iter(_dataset())
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected)


def test_orbax_round_trip_of_iterator(tmp_path):
    it = iter(_dataset())
    _take(it, 2)
    with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
        manager.save(7, args=ocp.args.Composite(data=pipeline.checkpoint_save_args(it)))
        manager.wait_until_finished()
    expected = _take(it, 2)
    fresh = iter(_dataset())
    with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
        restored = manager.restore(
            7, args=ocp.args.Composite(data=pipeline.checkpoint_restore_args(fresh))
        )
    _assert_batches_equal(_take(restored["data"], 2), expected)


def test_process_shards_are_disjoint_and_cover_each_epoch():
    source = _png_source()
    per_process = [
        [
            r["id"]
            for r in itertools.islice(
                pipeline.sharded_records(source, seed=3, process_index=p, process_count=2),
                2 * N_IMAGES // 2,
            )
        ]
        for p in range(2)
    ]
    for epoch in range(2):
        half = N_IMAGES // 2
        shard0 = set(per_process[0][epoch * half : (epoch + 1) * half])
        shard1 = set(per_process[1][epoch * half : (epoch + 1) * half])
        assert len(shard0) == len(shard1) == half
        assert not shard0 & shard1
        assert shard0 | shard1 == set(range(N_IMAGES))


def test_epochs_are_differently_permuted():
    ids = [
        r["id"]
        for r in itertools.islice(
            pipeline.sharded_records(_png_source(), seed=3, process_index=0, process_count=1),
            3 * N_IMAGES,
        )
    ]
    epochs = [ids[e * N_IMAGES : (e + 1) * N_IMAGES] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(N_IMAGES))
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    assert epochs[0] != list(range(N_IMAGES))


def test_crops_do_not_depend_on_process_layout():
    """Global position q has the same crops on 1 process (batch 4) as on 2 (batch 2 each)."""
    single = next(iter(_dataset(per_process_batch=4)))
    for p in range(2):
        part = next(iter(_dataset(per_process_batch=2, process_index=p, process_count=2)))
        for key in ("global_crops", "local_crops"):
            np.testing.assert_array_equal(part[key], single[key][:, p::2])


def test_processes_get_different_images_and_masks():
    a = next(iter(_dataset(per_process_batch=2, process_index=0, process_count=2)))
    b = next(iter(_dataset(per_process_batch=2, process_index=1, process_count=2)))
    assert not np.array_equal(a["global_crops"], b["global_crops"])
    assert not np.array_equal(a["masks"], b["masks"])


def test_masks_agree_with_indices_weights_and_groups():
    group = 2
    for batch in _take(iter(_dataset(per_process_batch=6, mask_group_size=group)), 4):
        masks = batch["masks"]
        n_groups = batch["mask_indices"].shape[0]
        assert n_groups == 3
        for g in range(n_groups):
            group_masks = masks[:, g * group : (g + 1) * group]  # [2, b, N]
            valid = batch["mask_valid"][g]
            n_masked = int(valid.sum())
            assert valid[:n_masked].all() and not valid[n_masked:].any()
            idx = batch["mask_indices"][g][:n_masked]
            rebuilt = np.zeros(2 * group * N_TOKENS, bool)
            rebuilt[idx] = True
            np.testing.assert_array_equal(rebuilt.reshape(2, group, N_TOKENS), group_masks)
            # weight of a token = 1 / (masked tokens of its crop); padding is zero.
            per_crop = group_masks.reshape(2 * group, N_TOKENS).sum(axis=1)
            np.testing.assert_allclose(
                batch["mask_weights"][g][:n_masked], 1.0 / per_crop[idx // N_TOKENS]
            )
            assert not batch["mask_weights"][g][n_masked:].any()
            assert not batch["mask_indices"][g][n_masked:].any()
            # Half of the group's 2b crops are drawn with a mask (recipe s7).
            assert 0 < (per_crop > 0).sum() <= group
        # Groups are independent draws.
        assert not all(
            np.array_equal(masks[:, 0:group], masks[:, g * group : (g + 1) * group])
            for g in range(1, 3)
        )


def test_uint16_and_decoded_array_records():
    rng = np.random.default_rng(1)
    img16 = (rng.integers(0, 256, (40, 34)) * 257).astype(np.uint16)
    png16 = cv2.imencode(".png", img16)[1].tobytes()
    np.testing.assert_array_equal(pipeline.decode_image(png16), img16)
    np.testing.assert_array_equal(pipeline.decode_image(img16[:, :, None]), img16)
    as_bytes = [{"image": png16}] * 4
    as_array = [{"image": img16[:, :, None]}] * 4
    a = next(iter(_dataset(as_bytes)))
    b = next(iter(_dataset(as_array)))
    _assert_batches_equal([a], [b])


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        _dataset(per_process_batch=4, mask_group_size=3)
    with pytest.raises(ValueError):
        _dataset(patch_size=5)
    with pytest.raises(ValueError):
        _dataset(seed=-1)


def test_multiprocess_workers_give_the_same_batches():
    # Grain workers read absl flags; a real entry point parses them via absl.app.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    expected = _take(iter(_dataset()), 4)
    it = iter(_dataset(num_workers=2))
    try:
        _assert_batches_equal(_take(it, 4), expected)
    finally:
        it.close()


def test_to_global_batch_on_eight_devices():
    devices = jax.devices()
    assert len(devices) == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shardings = {
        key: NamedSharding(mesh, P(*([None] * axis), "data"))
        for key, axis in pipeline.IMAGE_AXIS.items()
    }
    host = next(iter(_dataset(per_process_batch=8, mask_group_size=1)))
    arrays = pipeline.to_global_batch(host, shardings)
    for key, array in arrays.items():
        axis = pipeline.IMAGE_AXIS[key]
        assert array.shape == host[key].shape  # one process: global == host batch
        assert array.sharding == shardings[key]
        for shard in array.addressable_shards:
            assert shard.data.shape[axis] == host[key].shape[axis] // 8
            np.testing.assert_array_equal(np.asarray(shard.data), host[key][shard.index])
        np.testing.assert_array_equal(np.asarray(array), host[key])
    with pytest.raises(KeyError):
        pipeline.to_global_batch(host, {k: v for k, v in shardings.items() if k != "masks"})


# ------------------------------------------------------------------------------------------
# Fast PNG decode and the batch function
# ------------------------------------------------------------------------------------------


def _encode_png(image: np.ndarray, filters: list[int]) -> bytes:
    """Independent minimal PNG writer (grayscale, 8/16-bit) with a chosen filter per row."""
    height, width = image.shape
    depth = 16 if image.dtype == np.uint16 else 8
    raw = image.astype(">u2").view(np.uint8) if depth == 16 else image
    raw = raw.reshape(height, -1).astype(np.int64)
    step = depth // 8
    rows = []
    for y, kind in enumerate(filters):
        cur, above = raw[y], raw[y - 1] if y else np.zeros_like(raw[0])
        left = np.concatenate([np.zeros(step, np.int64), cur[:-step]])
        if kind == 0:
            out = cur
        elif kind == 1:
            out = cur - left
        elif kind == 2:
            out = cur - above
        else:  # Avg
            out = cur - (left + above) // 2
        rows.append(bytes([kind]) + (out % 256).astype(np.uint8).tobytes())

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    data = zlib.compress(b"".join(rows), 6)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", data[:50])
        + chunk(b"IDAT", data[50:])
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("row_filter", [0, 1, 2])
def test_fast_png_decode_matches_the_image_and_cv2(dtype, row_filter):
    rng = np.random.default_rng(row_filter)
    img = rng.integers(0, np.iinfo(dtype).max + 1, (23, 17)).astype(dtype)
    png = _encode_png(img, [row_filter] * 23)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), -1), img)
    fast = pipeline.decode_png_fast(png)
    assert fast is not None and fast.dtype == dtype
    np.testing.assert_array_equal(fast, img)
    np.testing.assert_array_equal(pipeline.decode_image(np.frombuffer(png, np.uint8)), img)
    # What cv2.imencode writes (the data preparation's encoder) takes the fast path.
    assert pipeline.decode_png_fast(cv2.imencode(".png", img)[1].tobytes()) is not None


def test_other_pngs_fall_back_to_cv2():
    img = np.random.default_rng(0).integers(0, 256, (12, 9)).astype(np.uint8)
    for filters in ([1] * 6 + [2] * 6, [3] * 12):  # mixed filters, Avg
        png = _encode_png(img, filters)
        assert pipeline.decode_png_fast(png) is None
        np.testing.assert_array_equal(pipeline.decode_image(png), img)
    rgb = cv2.imencode(".png", np.dstack([img] * 3))[1].tobytes()
    assert pipeline.decode_png_fast(rgb) is None
    good = _encode_png(img, [1] * 12)
    corrupt = good[:60] + bytes([good[60] ^ 0xFF]) + good[61:]
    assert pipeline.decode_png_fast(corrupt) is None
    assert pipeline.decode_png_fast(good[:-40]) is None
    with pytest.raises(ValueError):
        pipeline.decode_image(b"not a png at all")


def test_batch_function_equals_stacking_float_crops():
    source = _png_source(3)
    images = [pipeline.decode_image(r["image"]) for r in source]
    levels = [
        augment.multi_crop_levels(im, np.random.default_rng(k), CFG) for k, im in enumerate(images)
    ]
    floats = [augment.multi_crop(im, np.random.default_rng(k), CFG) for k, im in enumerate(images)]
    batch = pipeline.batch_crop_levels(levels)
    expected = pipeline.stack_crop_major(floats)
    assert set(batch) == set(expected)
    for key in batch:
        assert batch[key].shape == expected[key].shape and batch[key].dtype == np.float32
        np.testing.assert_array_equal(batch[key], expected[key])


# ------------------------------------------------------------------------------------------
# Mixtures (config.data.sources) and stage offsets
# ------------------------------------------------------------------------------------------


def _id_source(first: int, n: int) -> list[dict]:
    """Records that only say who they are (the record streams never decode them)."""
    return [{"id": first + i} for i in range(n)]


def _mixture(weights=(0.8, 0.2), sizes=(20, 7)) -> pipeline.Mixture:
    sources = tuple(_id_source(1000 * i, n) for i, n in enumerate(sizes))
    return pipeline.Mixture(sources, tuple(weights), tuple(f"s{i}" for i in range(len(sizes))))


def _source_ids(records) -> np.ndarray:
    return np.array([r["id"] // 1000 for r in records])


def test_mixture_counts_are_within_binomial_noise_of_the_weights():
    mixture, n = _mixture(), 2000
    records = pipeline.sharded_records(mixture, seed=3, process_index=0, process_count=1)
    ids = _source_ids(records[i] for i in range(n))
    counts = np.bincount(ids, minlength=2)
    sigma = np.sqrt(n * 0.8 * 0.2)
    assert abs(counts[1] - 0.2 * n) < 3 * sigma, counts
    # Every source is read in whole epochs of its own: in the first window the small source's
    # 7 records appear equally often (to within one epoch).
    window = [records[i]["id"] for i in range(pipeline.MIX_WINDOW)]
    small = np.bincount([i - 1000 for i in window if i >= 1000], minlength=7)
    assert small.min() > 0 and small.max() - small.min() <= 1, small
    # The window shuffle spreads the sources over processes whose stride matches the
    # interleaving period (4:1 -> every 5th position): each of 5 processes gets about 20%.
    for p in range(5):
        shard_records = pipeline.sharded_records(mixture, seed=3, process_index=p, process_count=5)
        share = _source_ids(shard_records[i] for i in range(400)).mean()
        assert abs(share - 0.2) < 3 * np.sqrt(0.16 / 400), (p, share)


@pytest.mark.parametrize("weights", [(0.8, 0.2), (5.0, 3.0, 2.0), (1.0, 1.0)])
def test_source_counts_equal_the_streamed_sources(weights):
    mixture = _mixture(weights, sizes=(20, 7, 11)[: len(weights)])
    stream = pipeline.mixed_stream(mixture, seed=5)
    ids = _source_ids(stream[i] for i in range(3 * pipeline.MIX_WINDOW + 100))
    for n in (
        0,
        1,
        17,
        pipeline.MIX_WINDOW - 1,
        pipeline.MIX_WINDOW,
        2 * pipeline.MIX_WINDOW + 5,
        len(ids),
    ):
        expected = np.bincount(ids[:n], minlength=len(weights))
        np.testing.assert_array_equal(pipeline.source_counts(mixture, 5, n), expected, str(n))
    # Grain's interleaving without the window shuffle, against the closed form.
    plain = pipeline.grain.MapDataset.mix(
        [pipeline.grain.MapDataset.source([i]).repeat() for i in range(len(weights))],
        weights=mixture.proportions,
    )
    plain_ids = np.array([plain[i] for i in range(700)])
    for n in range(0, 700, 37):
        np.testing.assert_array_equal(
            pipeline._interleaved_counts(n, mixture.proportions),
            np.bincount(plain_ids[:n], minlength=len(weights)),
        )


def test_mixture_weights_and_validation():
    assert pipeline.mixture_weights([30, 10], ["proportional", "proportional"]) == (30.0, 10.0)
    assert pipeline.mixture_weights([30, 10], [0.5, 2]) == (0.5, 2.0)
    with pytest.raises(ValueError, match="proportional"):
        pipeline.mixture_weights([30, 10], ["proportional", 2.0])
    assert _mixture((0.8, 0.2)).proportions == (400, 100)
    np.testing.assert_allclose(_mixture((3.0, 1.0)).shares, [0.75, 0.25])
    with pytest.raises(ValueError, match="> 0"):
        _mixture((1.0, 0.0))
    with pytest.raises(ValueError, match="no records"):
        pipeline.Mixture(([], [{"id": 0}]), (1.0, 1.0), ("a", "b"))


def test_mixture_iterator_resumes_exactly():
    """Kill and resume in the middle of a mixture: iterator state after 2 batches, restored
    into a freshly built dataset (as after a restart), gives the next batches exactly."""
    mixture = pipeline.Mixture(
        (_png_source(12, seed=0), _png_source(5, seed=1)), (0.8, 0.2), ("a", "b")
    )
    it = iter(_dataset(mixture))
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = iter(_dataset(mixture))
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected)
    # ... and differs from the single-source stream of its first source.
    first = _take(iter(_dataset(mixture.sources[0])), 1)[0]
    assert not np.array_equal(
        first["global_crops"], _take(iter(_dataset(mixture)), 1)[0]["global_crops"]
    )


def test_start_position_continues_the_stream():
    """A later stage's dataset starts at a global position: same records and crops as the
    stream from 0 there (its masks are a separate stream)."""
    source = _png_source()
    whole = pipeline.sharded_records(source, seed=3, process_index=0, process_count=1)
    later = pipeline.sharded_records(
        source, seed=3, process_index=0, process_count=1, start_position=8
    )
    assert [later[i]["id"] for i in range(20)] == [whole[i + 8]["id"] for i in range(20)]
    base = _take(iter(_dataset()), 3)
    stage = next(iter(_dataset(start_position=8)))
    for key in ("global_crops", "local_crops"):
        np.testing.assert_array_equal(stage[key], base[2][key])
    assert not np.array_equal(stage["masks"], base[0]["masks"])
