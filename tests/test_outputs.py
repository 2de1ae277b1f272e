"""keypoints.json is written a chunk of records at a time, to the byte of one json.dumps of them all."""
from __future__ import annotations

import json

import numpy as np
import pytest

import runner.outputs as outputs
from tasks.evaluation import PoseColumns


def columns(n: int, seed: int = 0) -> PoseColumns:
    rng = np.random.default_rng(seed)
    return PoseColumns(rng.integers(1, 5, n), rng.uniform(0, 500, (n, 4)).astype(np.float32),
                       rng.uniform(1e3, 1e5, n), rng.uniform(0, 1, n).astype(np.float32),
                       rng.uniform(0, 600, (n, 17, 3)).astype(np.float32))


@pytest.mark.parametrize("n, chunk", [(0, 3), (1, 3), (7, 3), (9, 3), (50, 1000)])
def test_chunked_results_are_one_json_dumps(tmp_path, monkeypatch, n, chunk):
    monkeypatch.setattr(outputs, "RESULTS_PER_CHUNK", chunk)
    c = columns(n)
    rows = np.random.default_rng(1).permutation(n)[: max(0, n - 2)]
    scores = np.random.default_rng(2).uniform(0, 1, len(rows))
    outputs.write_results(tmp_path / "keypoints.json", c, rows, scores)
    assert (tmp_path / "keypoints.json").read_text() == json.dumps(c.records(rows, scores))
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    def parts():
        yield "["
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        outputs.atomic_write_parts(tmp_path / "keypoints.json", parts())
    assert list(tmp_path.iterdir()) == []
