"""What travels to nodes that do not share the driver's storage: the model, the images, and reads that fail.

- ``data_sample``: a few of the run's image files with their sizes; each worker says
  whether its node holds them (``cluster.actor.first_missing``, devices.json's
  ``data_missing``).
- ``shipped_model``: on a Ray cluster (``--address``), the model's bytes in the object
  store once per run; each worker opens the driver's path where its node holds the same
  bytes, else a node-local copy (``cluster.staging``; devices.json's ``model_source``).
- ``ImageShipping``: which workers get the images' bytes in their shards (``--ship-images``),
  the shards it packs for them, and the check that sends a shard whose images a worker
  could not read to another worker, on another node where there is one.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from cluster.actor import Shard, ShardResult
from cluster.session import Session
from cluster.staging import ShippedModel, model_files, ship_model
from runner.errors import RunError
from tasks.dataset import BoxSet
from tasks.files import file_size

#: Image files each worker looks for on its node: spread over the run's images.
SAMPLE_FILES = 8


def data_sample(box_set: BoxSet, n: int = SAMPLE_FILES) -> tuple[tuple[str, int], ...]:
    """(path, size) of ``n`` image files spread over the run's, first and last included; files the driver
    cannot see itself are left out (they are missing everywhere: a skip, not a node's fault)."""
    paths = list(dict.fromkeys(box_set.image_paths[b.image_id] for b in box_set.boxes))
    picked = sorted({round(k * (len(paths) - 1) / max(1, n - 1)) for k in range(n)}) if paths else []
    sizes = [(paths[k], file_size(paths[k])) for k in picked]
    return tuple((path, size) for path, size in sizes if size is not None)


def shipped_model(session: Session, model_path: str) -> ShippedModel | None:
    """The model's bytes in Ray's object store for a cluster's workers; None on this host's own Ray
    (every worker sees the driver's files) or without a model file (sim)."""
    if not session.existing or not model_path:
        return None
    return ship_model(model_files(model_path))


class DataNotShared(RunError):
    """--ship-images never, and a worker's node cannot see the run's images: one line, before any shard."""


@dataclass
class ImageShipping:
    """The run's workers by node, and those whose shards carry the images' bytes."""

    ship_to: set[str]  # worker labels
    node_of: dict[str, str]  # worker label -> node
    bytes_shipped: int = 0  # image bytes packed into shards so far

    @classmethod
    def decide(cls, described: list[dict], mode: str) -> ImageShipping:
        """``--ship-images`` over the workers as they described themselves; ``never`` with a worker
        whose node lacks the data is one error line, before any shard runs."""
        missing = [d for d in described if d.get("data_missing")]
        if mode == "never" and missing:
            d = missing[0]
            raise DataNotShared(f"node {d['node']} ({d['device']}) cannot see {d['data_missing']}: mount the data there "
                           "at the same path, or drop --ship-images never to send the images in the shards")
        ship = {d["device"] for d in described if mode == "always" or (mode == "auto" and d.get("data_missing"))}
        for d in described:
            d["images"] = "shipped" if d["device"] in ship else "local"
        return cls(ship, {d["device"]: d["node"] for d in described})

    def package(self, worker: str, shard: Shard) -> Shard:
        """``shard`` as ``worker`` gets it: with the images' bytes where its node cannot read them."""
        if worker not in self.ship_to:
            return shard
        data = {}
        for image_id, path in shard.image_paths.items():
            try:
                data[image_id] = Path(path).read_bytes()
            except OSError:  # the driver cannot read it either: the worker's own read names the error
                continue
        self.bytes_shipped += sum(len(b) for b in data.values())
        return replace(shard, image_bytes=data)

    def check(self, worker: str, result: ShardResult) -> tuple[str, set[str]] | None:
        """A result with boxes skipped for images its worker could not read: (why, the workers to avoid: its
        node's, where another node has workers); None: the result stands."""
        if not result.skipped:
            return None
        node = self.node_of.get(worker, "?")
        same_node = {w for w, n in self.node_of.items() if n == node}
        avoid = same_node if set(self.node_of) - same_node else {worker}
        return (f"{len(result.skipped)} boxes' images could not be read on node {node} "
                f"(first: {result.skipped[0][1]})", avoid)
