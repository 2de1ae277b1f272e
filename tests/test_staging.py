"""cluster/staging.py on a local Ray: a model the node lacks, or holds with other bytes, arrives
through the object store once per node, into a cache by sha256 that later workers and runs reuse.

One host stands for several nodes here: a worker is told a driver path that does not exist
(a node without the driver's storage) or holds other bytes (a stale copy), while the bytes
shipped are the real file's. tests/test_two_nodes_harness.py checks a second node for real.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from cluster import staging  # noqa: E402
from cluster.staging import (DIFFERS, ShippedModel, StagingError, local_model, model_files,  # noqa: E402
                             ship_model)
from ray_support import private_ray  # noqa: E402

MB = 1 << 20


@pytest.fixture(scope="module")
def local_ray():
    with private_ray(sys.modules[__name__]):
        yield


def write_om(folder: Path, size: int = 4 * MB, seed: int = 0) -> Path:
    """A model with a sidecar, as tasks/atc.py leaves one: ``m.om`` and ``m.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    om = folder / "m.om"
    om.write_bytes(hashlib.sha256(str(seed).encode()).digest() * (size // 32))
    om.with_suffix(".json").write_text(json.dumps({"gears": [1, 4, 8], "seed": seed}))
    return om


def elsewhere(shipped: ShippedModel, path: Path) -> ShippedModel:
    """The same bytes, described as lying at ``path`` on the driver: a node sees ``path``, not the file."""
    return dataclasses.replace(shipped, files=dataclasses.replace(shipped.files, path=path))


@ray.remote(num_cpus=0)
def stage(shipped: ShippedModel, cache: str, barrier: str | None = None, parties: int = 1) -> tuple[str, str, int]:
    """``local_model`` in a worker process, after ``parties`` workers reached ``barrier`` (a folder)."""
    if barrier:
        Path(barrier, str(os.getpid())).touch()
        while len(os.listdir(barrier)) < parties:
            time.sleep(0.001)
    path, how = local_model(shipped, cache)
    return str(path), how, os.getpid()


def test_model_files_names_the_sidecar_and_hashes_each_file(tmp_path, monkeypatch):
    om = write_om(tmp_path / "models")
    (tmp_path / "models" / "w.pth").write_bytes(b"weights")
    (tmp_path / "models" / "w.json").write_text("{}")  # beside a checkpoint: not part of it
    hashed = []
    monkeypatch.setattr(staging, "file_sha256", lambda p: hashed.append(Path(p).name) or "0" * 64)
    files = model_files(om)
    assert [e.name for e in files.entries] == ["m.om", "m.json"] and files.main.size == 4 * MB
    assert hashed == ["m.om", "m.json"]
    assert [e.name for e in model_files(tmp_path / "models" / "w.pth").entries] == ["w.pth"]
    with pytest.raises(StagingError, match=r"model file .*gone.om not found"):
        model_files(tmp_path / "gone.om")


def test_a_node_without_the_file_gets_its_bytes_and_sidecar_into_its_cache(tmp_path, local_ray):
    om = write_om(tmp_path / "driver")
    shipped = elsewhere(ship_model(model_files(om)), tmp_path / "not-on-this-node" / "m.om")
    path, how, _ = ray.get(stage.remote(shipped, str(tmp_path / "cache")))
    files = shipped.files
    assert how == "shipped" and Path(path) == tmp_path / "cache" / files.main.sha256 / "m.om"
    assert Path(path).read_bytes() == om.read_bytes()
    # The sidecar sits beside it under its own name: tasks/backends/om.py finds it the same way.
    assert Path(path).with_suffix(".json").read_text() == om.with_suffix(".json").read_text()
    assert oct(Path(path).stat().st_mode & 0o777) == "0o644"  # ais_bench refuses writable models
    assert not [p for p in Path(path).parent.iterdir() if p.name.endswith(".tmp")]


def test_workers_starting_at_once_fetch_once_and_a_later_run_finds_the_cache(tmp_path, local_ray):
    om = write_om(tmp_path / "driver", size=32 * MB)
    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    shipped = elsewhere(ship_model(model_files(om)), tmp_path / "hidden" / "m.om")
    results = ray.get([stage.remote(shipped, str(cache), str(barrier), 2) for _ in range(2)])
    assert len({pid for _, _, pid in results}) == 2  # two processes, as two workers of one node
    assert sorted(how for _, how, _ in results) == ["cached", "shipped"]  # one fetched, the other waited
    assert len({path for path, _, _ in results}) == 1
    # A later run ships again (a new command) and its worker, a fresh process, finds the node's cache.
    again = elsewhere(ship_model(model_files(om)), tmp_path / "hidden" / "m.om")
    path, how, _ = ray.get(stage.remote(again, str(cache)))
    assert how == "cached" and path == results[0][0]
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == shipped.files.main.sha256


def test_the_drivers_own_file_is_opened_where_it_is(tmp_path, local_ray):
    om = write_om(tmp_path / "shared")
    path, how, _ = ray.get(stage.remote(ship_model(model_files(om)), str(tmp_path / "cache")))
    assert (Path(path), how) == (om, "local") and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("change", ["other size", "same size", "sidecar"])
def test_a_local_copy_with_other_bytes_is_never_opened(tmp_path, local_ray, change):
    om = write_om(tmp_path / "driver")
    shipped = ship_model(model_files(om))
    stale = write_om(tmp_path / "node", seed=1)  # the driver's path on this node, other bytes
    if change == "other size":
        stale.write_bytes(stale.read_bytes()[:MB])
    elif change == "sidecar":  # the OM itself is the same; its gears are not
        stale.write_bytes(om.read_bytes())
    path, how, _ = ray.get(stage.remote(elsewhere(shipped, stale), str(tmp_path / "cache")))
    assert how == "shipped" + DIFFERS and Path(path).parent == tmp_path / "cache" / shipped.files.main.sha256
    assert Path(path).read_bytes() == om.read_bytes()
    assert Path(path).with_suffix(".json").read_text() == om.with_suffix(".json").read_text()
    assert local_model(elsewhere(shipped, stale), tmp_path / "cache")[1] == "cached" + DIFFERS


def test_a_cached_sidecar_that_differs_is_fetched_again(tmp_path, local_ray):
    om = write_om(tmp_path / "driver")
    shipped = elsewhere(ship_model(model_files(om)), tmp_path / "hidden" / "m.om")
    path, how = local_model(shipped, tmp_path / "cache")
    path.with_suffix(".json").write_text('{"gears": [1, 2, 4]}')  # made from the same OM another time
    assert local_model(shipped, tmp_path / "cache") == (path, "shipped")
    assert path.with_suffix(".json").read_text() == om.with_suffix(".json").read_text()


def test_the_default_cache_is_the_nodes_variable_then_the_users_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_NODE_CACHE", str(tmp_path / "node"))
    assert staging.node_cache_root() == tmp_path / "node"
    assert staging.node_cache_root(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("RUNNER_NODE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert staging.node_cache_root() == tmp_path / "xdg" / "runner" / "models"


def test_bytes_that_do_not_match_or_a_cache_that_cannot_be_written_are_one_line(tmp_path, local_ray):
    om = write_om(tmp_path / "driver")
    shipped = elsewhere(ship_model(model_files(om)), tmp_path / "hidden" / "m.om")
    main = dataclasses.replace(shipped.files.main, sha256="f" * 64)  # the driver's file changed after hashing
    changed = dataclasses.replace(shipped, files=dataclasses.replace(shipped.files,
                                                                    entries=(main, *shipped.files.entries[1:])))
    with pytest.raises(StagingError, match=r"^m.om: the bytes shipped from the driver have .* run again$"):
        local_model(changed, tmp_path / "cache")
    # Nothing half-written and nothing wrong kept: only the lock file.
    assert [p.name for p in (tmp_path / "cache").rglob("*")] == [f"{main.sha256}.lock"]
    (tmp_path / "file").write_text("")
    with pytest.raises(StagingError, match=r"^node cache .*file/cache: cannot store model m.om \(.*\); free the "
                                           r"disk or set RUNNER_NODE_CACHE to a writable folder$"):
        local_model(shipped, tmp_path / "file" / "cache")
