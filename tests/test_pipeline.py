"""Tests for raddino_jax.data.pipeline: determinism, resumption, sharding, masks, global arrays."""

import dataclasses
import itertools
import json
import struct
import threading
import time
import zlib

import cv2
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from raddino_jax.data import augment, layout, mixture, pipeline, prefetch
from raddino_jax.data.augment import MultiCropConfig
from raddino_jax.data.layout import IMAGE_AXIS
from raddino_jax.data.png import decode_image, decode_png_fast
from raddino_jax.ssl import masking

CFG = MultiCropConfig(global_size=28, local_size=14, n_local=2)  # uint8 transfer (default)
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


@pytest.mark.parametrize("transfer", augment.TRANSFER_DTYPES)
def test_batch_layout(transfer):
    cfg = dataclasses.replace(CFG, transfer_dtype=transfer)
    batch = next(iter(_dataset(crop_cfg=cfg)))
    upper = masking.mask_upper_bound(4, N_TOKENS)
    crops = np.dtype(transfer)
    expected = {
        "global_crops": ((2, 4, 28, 28, 1), crops),
        "local_crops": ((2, 4, 14, 14, 1), crops),
        "masks": ((2, 4, N_TOKENS), np.bool_),
        "mask_indices": ((2, upper), np.int32),
        "mask_weights": ((2, upper), np.float32),
        "mask_valid": ((2, upper), np.bool_),
    }
    assert set(batch) == set(expected) == set(IMAGE_AXIS)
    spec = layout.batch_spec(cfg, layout.MaskSpec(4, 2, (4, 4), (0.1, 0.5), 0.5))
    for key, (shape, dtype) in expected.items():
        assert batch[key].shape == spec[key].shape == shape, key
        assert batch[key].dtype == spec[key].dtype == dtype, key
    if transfer == "float32":  # normalised crops of real images: both sides of the mean
        assert batch["global_crops"].min() < 0 < batch["global_crops"].max()
    else:  # pixel levels of real images
        assert batch["global_crops"].min() < np.iinfo(crops).max // 2 < batch["global_crops"].max()


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
        manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(item=it)))
        manager.wait_until_finished()
    expected = _take(it, 2)
    fresh = iter(_dataset())
    with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
        restored = manager.restore(
            7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(item=fresh))
        )
    _assert_batches_equal(_take(restored["data"], 2), expected)


def test_process_shards_are_disjoint_and_cover_each_epoch():
    source = _png_source()
    per_process = [
        [
            r["id"]
            for r in itertools.islice(
                pipeline.shard(mixture.record_stream(source, 3), p, 2),
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
            pipeline.shard(mixture.record_stream(_png_source(), 3), 0, 1),
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
    np.testing.assert_array_equal(decode_image(png16), img16)
    np.testing.assert_array_equal(decode_image(img16[:, :, None]), img16)
    as_bytes = [{"image": png16}] * 4
    as_array = [{"image": img16[:, :, None]}] * 4
    cfg16 = dataclasses.replace(CFG, transfer_dtype="uint16")
    a = next(iter(_dataset(as_bytes, crop_cfg=cfg16)))
    b = next(iter(_dataset(as_array, crop_cfg=cfg16)))
    _assert_batches_equal([a], [b])
    assert a["global_crops"].dtype == np.uint16


def test_uint16_records_refuse_uint8_transfer():
    """Never quantise silently: the error names the key and the value to set."""
    img16 = (np.random.default_rng(1).integers(0, 65536, (40, 34))).astype(np.uint16)
    source = [{"image": img16}] * 4
    with pytest.raises(
        ValueError, match=r'config\.data\.transfer_dtype.*set config\.data\.transfer_dtype="uint16"'
    ):
        next(iter(_dataset(source)))


def _device_normalised(batch: dict, cfg: MultiCropConfig) -> dict:
    """The train step's normalisation of a host batch's crops, jitted as in the step."""
    from raddino_jax.train.step import normalise_crops

    crops = {k: batch[k] for k in ("global_crops", "local_crops")}
    return jax.device_get(jax.jit(lambda c: normalise_crops(c, (cfg.mean, cfg.std)))(crops))


def test_integer_transfer_normalised_on_device_equals_host_float_crops():
    """Same seed, three transfer dtypes: uint8 and uint16 levels normalised by the step's
    `normalise_crops` equal the host-normalised float32 crops within 1e-6 (float32 rounding of
    the same formula); uint16 is exactly 257 x uint8; everything else in the batch is equal."""
    batches = {}
    for transfer in augment.TRANSFER_DTYPES:
        cfg = dataclasses.replace(CFG, transfer_dtype=transfer)
        batches[transfer] = _take(iter(_dataset(crop_cfg=cfg)), 2)
    for i, host in enumerate(batches["float32"]):
        u8, u16 = batches["uint8"][i], batches["uint16"][i]
        for key in ("global_crops", "local_crops"):
            np.testing.assert_array_equal(u16[key], u8[key].astype(np.uint16) * 257)
        for levels in (u8, u16):
            normalised = _device_normalised(levels, CFG)
            for key in ("global_crops", "local_crops"):
                assert normalised[key].dtype == np.float32
                np.testing.assert_allclose(normalised[key], host[key], rtol=0, atol=1e-6)
            for key in ("masks", "mask_indices", "mask_weights", "mask_valid"):
                np.testing.assert_array_equal(levels[key], host[key])
        # float crops pass through unchanged
        np.testing.assert_array_equal(
            _device_normalised(host, CFG)["local_crops"], host["local_crops"]
        )


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
        key: NamedSharding(mesh, P(*([None] * axis), "data")) for key, axis in IMAGE_AXIS.items()
    }
    host = next(iter(_dataset(per_process_batch=8, mask_group_size=1)))
    arrays = prefetch.to_global_batch(host, shardings)
    for key, array in arrays.items():
        axis = IMAGE_AXIS[key]
        assert array.shape == host[key].shape  # one process: global == host batch
        assert array.sharding == shardings[key]
        for shard in array.addressable_shards:
            assert shard.data.shape[axis] == host[key].shape[axis] // 8
            np.testing.assert_array_equal(np.asarray(shard.data), host[key][shard.index])
        np.testing.assert_array_equal(np.asarray(array), host[key])
    with pytest.raises(KeyError):
        prefetch.to_global_batch(host, {k: v for k, v in shardings.items() if k != "masks"})


class _Counting:
    """A host-batch iterator that counts the batches read from it (by the prefetch thread)."""

    def __init__(self, iterator, fail_at: int | None = None):
        self.iterator, self.count, self.fail_at = iterator, 0, fail_at

    def __next__(self):
        if self.count == self.fail_at:
            raise RuntimeError("broken record")
        self.count += 1
        return next(self.iterator)

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


PREFETCH_DATA = dict(per_process_batch=8, mask_group_size=1)


def _eight_device_batch(crop_cfg: MultiCropConfig = CFG) -> dict[str, jax.ShapeDtypeStruct]:
    """`layout.batch_spec` of a `PREFETCH_DATA` batch, its image axes split over 8 devices."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    masks = layout.MaskSpec(8, 1, (4, 4), (0.1, 0.5), 0.5)
    return {
        key: jax.ShapeDtypeStruct(
            leaf.shape,
            leaf.dtype,
            sharding=NamedSharding(mesh, P(*[None] * IMAGE_AXIS[key], "data")),
        )
        for key, leaf in layout.batch_spec(crop_cfg, masks).items()
    }


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "device-prefetch"]


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_device_prefetcher_keeps_order_and_state_of_first_unused_batch(depth):
    """The prefetcher yields the iterator's batches as global arrays, in order; however far
    its thread has read ahead, its state is the iterator's after the batches it returned, in
    the bytes Grain's handler writes, and restores into a bare iterator or a prefetcher."""
    bare = iter(_dataset(**PREFETCH_DATA))
    expected, states = [], []
    for _ in range(5):
        states.append(bare.get_state())
        expected.append(next(bare))
    spec = _eight_device_batch()
    source = _Counting(iter(_dataset(**PREFETCH_DATA)))
    prefetcher = prefetch.DevicePrefetcher(source, spec, depth)
    assert prefetcher.threaded == (depth >= 2)
    for k in range(3):
        batch = next(prefetcher)
        assert set(batch) == set(spec)
        for key, array in batch.items():
            assert (array.shape, array.dtype, array.sharding) == (
                spec[key].shape,
                spec[key].dtype,
                spec[key].sharding,
            )
            np.testing.assert_array_equal(np.asarray(array), expected[k][key], err_msg=key)
    _wait_for(lambda: source.count == 3 + (depth if depth >= 2 else 0))  # read ahead
    state = prefetcher.get_state()
    assert state == json.dumps(states[3], indent=4).encode()
    prefetcher.close()
    assert not _prefetch_threads()
    fresh = iter(_dataset(**PREFETCH_DATA))
    fresh.set_state(json.loads(state))
    _assert_batches_equal(_take(fresh, 2), expected[3:5])
    resumed = prefetch.DevicePrefetcher(iter(_dataset(**PREFETCH_DATA)), spec, depth)
    resumed.set_state(state)
    resumed.start_prefetch()
    got = [jax.device_get(next(resumed)) for _ in range(2)]
    resumed.close()
    _assert_batches_equal(got, expected[3:5])


def test_orbax_checkpoint_through_the_prefetcher_is_the_bare_iterator_file(tmp_path):
    """Grain's Orbax handler saves the prefetcher's state as the bare iterator's file (so
    checkpoints from before the prefetcher restore), and restores into either."""
    bare = iter(_dataset(**PREFETCH_DATA))
    _take(bare, 2)
    with ocp.CheckpointManager(tmp_path / "bare", item_names=("data",)) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(item=bare)))
    expected = _take(bare, 2)
    spec = _eight_device_batch()
    source = _Counting(iter(_dataset(**PREFETCH_DATA)))
    prefetcher = prefetch.DevicePrefetcher(source, spec, 3)
    _take(prefetcher, 2)
    _wait_for(lambda: source.count == 5)
    with ocp.CheckpointManager(tmp_path / "ahead", item_names=("data",)) as manager:
        manager.save(
            2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(item=prefetcher))
        )
    prefetcher.close()
    name = "2/data/process_0-of-1.json"
    assert (tmp_path / "ahead" / name).read_text() == (tmp_path / "bare" / name).read_text()
    for directory in ("bare", "ahead"):
        targets = (
            iter(_dataset(**PREFETCH_DATA)),
            prefetch.DevicePrefetcher(iter(_dataset(**PREFETCH_DATA)), spec, 2),
        )
        for target in targets:
            with ocp.CheckpointManager(tmp_path / directory, item_names=("data",)) as manager:
                restored = manager.restore(
                    2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(item=target))
                )["data"]
            _assert_batches_equal([jax.device_get(b) for b in _take(restored, 2)], expected)
            if hasattr(restored, "close"):
                restored.close()
    assert not _prefetch_threads()


def test_device_prefetcher_reraises_the_iterator_error_in_order():
    source = _Counting(iter(_dataset(**PREFETCH_DATA)), fail_at=2)
    prefetcher = prefetch.DevicePrefetcher(source, _eight_device_batch(), 2)
    _take(prefetcher, 2)  # the batches before the error still arrive
    with pytest.raises(RuntimeError, match="broken record"):
        next(prefetcher)
    prefetcher.close()
    assert not _prefetch_threads()
    with pytest.raises(ValueError, match="device_prefetch"):
        prefetch.DevicePrefetcher(source, _eight_device_batch(), -1)


def test_device_prefetcher_keeps_host_counts_on_the_host_and_checks_the_batch():
    """A loop's host batch: the host counts come back as `last_host` (never transferred), the
    arrays as the step's batch; a batch of another transfer dtype than the step was compiled
    for is an error naming the array."""
    expected = next(iter(_dataset(**PREFETCH_DATA, host_counts=True)))
    prefetcher = prefetch.DevicePrefetcher(
        iter(_dataset(**PREFETCH_DATA, host_counts=True)), _eight_device_batch(), 0
    )
    batch = next(prefetcher)
    assert set(batch) == set(layout.BATCH_KEYS)
    assert set(prefetcher.last_host) == set(layout.HOST_KEYS)
    for key in layout.HOST_KEYS:
        np.testing.assert_array_equal(prefetcher.last_host[key], expected[key])
    prefetcher.close()
    uint16 = _eight_device_batch(dataclasses.replace(CFG, transfer_dtype="uint16"))
    mismatched = prefetch.DevicePrefetcher(iter(_dataset(**PREFETCH_DATA)), uint16, 0)
    with pytest.raises(ValueError, match="'global_crops' is uint8.*takes uint16"):
        next(mismatched)


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
    fast = decode_png_fast(png)
    assert fast is not None and fast.dtype == dtype
    np.testing.assert_array_equal(fast, img)
    np.testing.assert_array_equal(decode_image(np.frombuffer(png, np.uint8)), img)
    # What cv2.imencode writes (the data preparation's encoder) takes the fast path.
    assert decode_png_fast(cv2.imencode(".png", img)[1].tobytes()) is not None


def test_other_pngs_fall_back_to_cv2():
    img = np.random.default_rng(0).integers(0, 256, (12, 9)).astype(np.uint8)
    for filters in ([1] * 6 + [2] * 6, [3] * 12):  # mixed filters, Avg
        png = _encode_png(img, filters)
        assert decode_png_fast(png) is None
        np.testing.assert_array_equal(decode_image(png), img)
    rgb = cv2.imencode(".png", np.dstack([img] * 3))[1].tobytes()
    assert decode_png_fast(rgb) is None
    good = _encode_png(img, [1] * 12)
    corrupt = good[:60] + bytes([good[60] ^ 0xFF]) + good[61:]
    assert decode_png_fast(corrupt) is None
    assert decode_png_fast(good[:-40]) is None
    with pytest.raises(ValueError):
        decode_image(b"not a png at all")


def test_batch_function_equals_stacking_float_crops():
    source = _png_source(3)
    images = [decode_image(r["image"]) for r in source]
    levels = [
        augment.multi_crop_levels(im, np.random.default_rng(k), CFG) for k, im in enumerate(images)
    ]
    floats = [augment.multi_crop(im, np.random.default_rng(k), CFG) for k, im in enumerate(images)]
    batch = pipeline.batch_crop_levels(levels, dataclasses.replace(CFG, transfer_dtype="float32"))
    expected = {key: np.stack([f[key] for f in floats], axis=1) for key in floats[0]}
    assert set(batch) == set(expected)
    for key in batch:
        assert batch[key].shape == expected[key].shape and batch[key].dtype == np.float32
        np.testing.assert_array_equal(batch[key], expected[key])


# ------------------------------------------------------------------------------------------
# Stage offsets, undecodable records, elastic resume
# ------------------------------------------------------------------------------------------


def test_start_position_continues_the_stream():
    """A later stage's dataset starts at a global position: same records and crops as the
    stream from 0 there (its masks are a separate stream)."""
    base = _take(iter(_dataset()), 3)
    stage = next(iter(_dataset(start_position=8)))
    for key in ("global_crops", "local_crops"):
        np.testing.assert_array_equal(stage[key], base[2][key])
    assert not np.array_equal(stage["masks"], base[0]["masks"])


class _Logged(list):
    """A list source that records which indices were read."""

    def __init__(self, records):
        super().__init__(records)
        self.read: list[int] = []

    def __getitem__(self, index):
        self.read.append(index)
        return super().__getitem__(index)


def test_undecodable_and_wrong_shape_records_are_skipped_and_counted_deterministically():
    """A garbage record and a colour (3-channel) PNG in the stream: each position that holds
    one takes the next record that decodes and counts 1; the same on a second iterator and after
    set_state (a resume)."""
    source = _png_source(8)
    colour = np.zeros((40, 34, 3), np.uint8)
    source[2] = {"image": cv2.imencode(".png", colour)[1].tobytes(), "id": 2}
    source[5] = {"image": b"\x89PNG not an image", "id": 5}
    assert pipeline.checked_image(source[2]) is None and pipeline.checked_image(source[5]) is None
    one_epoch = 2  # 2 batches of 4 = the 8 records once
    runs = []
    for _ in range(2):
        batches = _take(iter(_dataset(source, host_counts=True)), 2 * one_epoch)
        runs.append(batches)
    _assert_batches_equal(*runs)
    counts = [int(b[layout.RECORDS_SKIPPED]) for b in runs[0]]
    assert all(not b[layout.SOURCE_IDS].any() for b in runs[0])  # one source: all source 0
    assert sum(counts[:one_epoch]) == 2 and sum(counts[one_epoch:]) == 2  # each epoch: both
    iterator = iter(_dataset(source, host_counts=True))
    _take(iterator, 1)
    state = iterator.get_state()
    resumed = iter(_dataset(source, host_counts=True))
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 3), runs[0][1:])
    assert layout.RECORDS_SKIPPED not in next(iter(_dataset(source)))  # only when asked
    broken = [{"image": b"broken", "id": i} for i in range(8)]
    with pytest.raises(pipeline.BadDataError, match="no record decodes"):
        next(iter(_dataset(broken)))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_stream_continues_from_the_step_on_another_process_count(before, after):
    """The elastic resume's arithmetic: k steps on `before` processes read exactly the global
    positions [0, k * B); a dataset started at position k * B on `after` processes reads the
    next ones, the same records an uninterrupted single-process stream reads there."""
    batch, steps = 8, 2  # global batch and steps before the change
    straight = _Logged(_png_source(10))
    _take(iter(_dataset(straight, per_process_batch=batch)), 2 * steps)

    def read(count: int, steps_: int, start: int) -> list[int]:
        source = _Logged(_png_source(10))
        for index in range(count):
            dataset = _dataset(
                source,
                per_process_batch=batch // count,
                process_index=index,
                process_count=count,
                start_position=start,
            )
            _take(iter(dataset), steps_)
        return source.read

    first = read(before, steps, 0)
    assert sorted(first) == sorted(straight.read[: steps * batch])
    then = read(after, steps, steps * batch)
    assert sorted(then) == sorted(straight.read[steps * batch :])
