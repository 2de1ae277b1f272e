"""Progress of one run: tqdm bars on a terminal, plain log lines otherwise, nothing with --quiet.

On a terminal (stderr is a TTY) there is one bar per device (its boxes and boxes/s)
and one in total (boxes, boxes/s and ETA). Elsewhere (a log file, CI, a test) each
finished shard is one line through ``log``.
"""
from __future__ import annotations

import sys

from cluster.actor import ShardResult


class Progress:
    def __init__(self, total_boxes: int, done_boxes: int, devices: list[str], shards: int, *,
                 quiet: bool, log, title: str = "") -> None:
        self.shards, self.log, self.quiet = shards, log, quiet
        self.bars: dict[str, object] = {}
        self.total = None
        if quiet or not sys.stderr.isatty():
            return
        from tqdm import tqdm

        self.total = tqdm(total=total_boxes, initial=done_boxes, desc=f"{title}total".strip(), unit="box",
                          position=0, dynamic_ncols=True, file=sys.stderr)
        for k, label in enumerate(devices, start=1):
            self.bars[label] = tqdm(desc=f"{label:>10}", unit="box", position=k, leave=False,
                                    dynamic_ncols=True, file=sys.stderr, bar_format="{desc}: {n_fmt} boxes "
                                    "[{elapsed}, {rate_fmt}]")

    def update(self, r: ShardResult) -> None:
        if self.total is None:
            if not self.quiet:
                self.log(f"  shard {r.shard_id + 1}/{self.shards} from {r.device}: {len(r.box_ids)} boxes")
            return
        n = len(r.box_ids)
        if r.device in self.bars:
            self.bars[r.device].update(n)
        self.total.update(n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        if self.total is not None:
            self.total.close()
