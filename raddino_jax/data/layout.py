"""The batch layout shared by the pipeline (which builds batches) and the sharding rules (which
place them): no dependencies, so lower layers can import it without Grain or OpenCV."""

# Axis of each batch array that indexes images; it is the axis that is split across
# processes and devices (see ``prefetch.to_global_batch``).
IMAGE_AXIS: dict[str, int] = {
    "global_crops": 1,
    "local_crops": 1,
    "masks": 1,
    "mask_indices": 0,
    "mask_weights": 0,
    "mask_valid": 0,
}
# The arrays of one batch (layout in data/pipeline.py's docstring), in the order the train step
# takes them; the loop, the sweep and the benchmarks build their batch shardings from this.
BATCH_KEYS: tuple[str, ...] = tuple(IMAGE_AXIS)
# Host-side count in a loop's host batch (`pipeline.make_dataset(count_skipped=True)`): records
# of the batch's positions that did not decode; `prefetch.DevicePrefetcher` takes it out.
RECORDS_SKIPPED = "records_skipped"
