"""Two `--backend om` runs started together on one empty --models-dir, on fake NPUs.

They race for every cache entry at once: the seeded checkpoint, the synthetic set, the
static-batch ONNX export and the OM that ATC makes of it. Each is written whole under a
name no other writer uses and renamed into place, so both runs finish with the same
keypoints, and the cache is left holding whole files only.
"""
import json
import sys

import pytest

from ray_support import at_once, cli_env, fake_npu_env, run_cli

pytest.importorskip("ray")


def test_two_om_runs_racing_for_one_fresh_cache_both_finish_alike(tmp_path):
    models = tmp_path / "models"
    runs = []
    for name in ("a", "b"):
        logs = tmp_path / f"logs-{name}"
        logs.mkdir()
        args = [sys.executable, "-m", "runner", "--synthetic", "6", "--bs", "4", "--devices", "0", "--backend", "om",
                "--models-dir", str(models), "--quiet", "--out", str(tmp_path / name)]
        runs.append(lambda args=args, logs=logs: run_cli(args, fake_npu_env(cli_env(), logs), tmp_path))
    at_once(*runs)
    a, b = (json.loads((tmp_path / name / "keypoints.json").read_text()) for name in ("a", "b"))
    assert len(a) == 6 and a == b
    assert len(list(models.glob("*-b4.om"))) == 1  # one cache entry, whoever renamed it last
    assert not [p for p in models.rglob("*") if p.name.endswith(".tmp")]
