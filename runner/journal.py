"""Finished shards on disk, so that ``--resume`` skips them after a crash or Ctrl-C.

One file per shard, written whole or not at all (``tasks.files.atomic_file``). ``fingerprint.json`` ties the journal to the
inputs and options that decide the numbers; resuming with others is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cluster.actor import ShardResult
from tasks.errors import UserError
from tasks.files import atomic_file, atomic_write_text


class JournalMismatch(UserError, ValueError):
    pass


class Journal:
    def __init__(self, directory: Path, fingerprint: dict) -> None:
        self.dir = Path(directory)
        self.fingerprint = fingerprint

    @staticmethod
    def previous_fingerprint(directory: Path) -> dict | None:
        """The fingerprint of the journal in ``directory``, if one was started there."""
        stamp = Path(directory) / "fingerprint.json"
        return json.loads(stamp.read_text()) if stamp.exists() else None

    def start(self, resume: bool) -> dict[int, ShardResult]:
        """Shards already done (when resuming); a fresh journal otherwise."""
        stamp = self.dir / "fingerprint.json"
        # A shard interrupted while being journalled (a killed driver) leaves only its temp file behind.
        for partial in self.dir.glob(".shard-*.tmp"):
            partial.unlink(missing_ok=True)
        if resume and stamp.exists():
            old = json.loads(stamp.read_text())
            if old != self.fingerprint:
                changed = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
                raise JournalMismatch(f"{self.dir}: --resume with different {', '.join(changed)} than the "
                                      "interrupted run; use the same options, or --overwrite to start again")
            return self._load()
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("shard-*.npz"):
            old.unlink()
        atomic_write_text(stamp, json.dumps(self.fingerprint, indent=1, sort_keys=True))
        return {}

    def discard_if_empty(self) -> None:
        """Remove a journal that holds no shard yet (a run refused before any shard ran), and its folder."""
        if self.dir.is_dir() and not any(self.dir.glob("shard-*.npz")):
            (self.dir / "fingerprint.json").unlink(missing_ok=True)
            if not any(self.dir.iterdir()):
                self.dir.rmdir()

    def _load(self) -> dict[int, ShardResult]:
        done = {}
        for path in sorted(self.dir.glob("shard-*.npz")):
            with np.load(path) as z:
                meta = json.loads(str(z["meta"]))
                done[meta["shard_id"]] = ShardResult(
                    box_ids=z["box_ids"], keypoints=z["keypoints"], crop_boxes=z["crop_boxes"],
                    call_seconds=z["call_seconds"], call_starts=z["call_starts"],
                    skipped=[tuple(s) for s in meta.pop("skipped")], **meta)
        return done

    def add(self, r: ShardResult) -> None:
        meta = {"shard_id": r.shard_id, "device": r.device, "skipped": r.skipped, "crops": r.crops,
                "calls": r.calls, "device_seconds": r.device_seconds, "busy_seconds": r.busy_seconds,
                "bytes_to_device": r.bytes_to_device, "bytes_from_device": r.bytes_from_device,
                "started": r.started, "finished": r.finished, "host_seconds": r.host_seconds}
        with atomic_file(self.dir / f"shard-{r.shard_id:06d}.npz", "wb") as f:
            np.savez(f, box_ids=r.box_ids, keypoints=r.keypoints, crop_boxes=r.crop_boxes,
                     call_seconds=np.asarray(r.call_seconds, np.float32),
                     call_starts=np.asarray(r.call_starts, np.float64), meta=np.array(json.dumps(meta)))
