"""ATC where CANN is: a driver host without ``atc`` has the ONNX converted on an NPU node of its Ray cluster.

    convert_where_cann_is(onnx, models_dir, soc, ...)   what tasks.atc.convert_to_om returns, made
                                                        here when `atc` is on PATH, else on an NPU node

The ONNX travels to the node through the object store (``cluster.staging``: not at all where
the node sees the driver's file), ``tasks.atc.convert_job`` runs there in a temporary folder, and
the OM and its sidecar come back into the driver's ``--models-dir`` under the name and with the
sidecar ``convert_to_om`` gives them. The sidecar records the CANN version of the ``atc`` that
ran, so a cached OM is converted again when no NPU node's ``atc`` has that version any more.

The tasks ask for no CPU and no NPU, only a node (hard node affinity): in a sweep the next
batch size's OM is converted while the workers hold every slot, and ATC needs no device.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import first_line
from cluster.staging import ModelFiles, local_model, model_files, ship_model
from tasks.atc import (ANY_VERSION, DEFAULT_PRECISION, FASTPOSE_CHW, AtcError, OmJob, atc_version, cached_om,
                       convert_job, convert_to_om, om_job)
from tasks.cann import SET_ENV
from tasks.export import INPUT_NAME
from tasks.files import atomic_file, atomic_write_text

#: How long a node may take to answer whether it has `atc` (a Ray worker process starting on it).
PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class AtcNode:
    """An NPU node of the cluster and the `atc` on its PATH (None: it has none)."""

    node_id: str
    host: str
    exe: str | None
    version: str | None


def convert_where_cann_is(onnx_path: str | Path, models_dir: str | Path, soc_version: str,
                          batch_size: int | None = None, gears: Sequence[int] | None = None,
                          timeout: float = 3600, *, input_name: str = INPUT_NAME,
                          input_chw: Sequence[int] = FASTPOSE_CHW, input_format: str = "NCHW",
                          precision_mode: str = DEFAULT_PRECISION,
                          log: Callable[[str], None] | None = None) -> Path:
    """``tasks.atc.convert_to_om``'s OM (same arguments, same cache), converted on this host when
    `atc` is on its PATH or Ray shows no NPU node, else on an NPU node of the Ray cluster.

    AtcError with one line when no host has `atc` and nothing is cached, or ATC fails.
    """
    options = dict(input_name=input_name, input_chw=input_chw, input_format=input_format,
                   precision_mode=precision_mode)
    nodes = npu_nodes() if shutil.which("atc") is None else []
    if not nodes:
        return convert_to_om(onnx_path, models_dir, soc_version, batch_size, gears, timeout, **options)
    onnx_path = Path(onnx_path).resolve()
    files = model_files(onnx_path) if onnx_path.is_file() else None  # hashed once: the cache key, then shipping
    sha = files.main.sha256 if files else None
    job = om_job(onnx_path, models_dir, soc_version, batch_size, gears, sha256=sha, **options)
    return convert_on_cluster(job, nodes, timeout, files, log)


def npu_nodes() -> list[dict]:
    """The live nodes of the Ray cluster this process is connected to that offer NPU slots."""
    try:
        import ray
    except ImportError:
        return []
    if not ray.is_initialized():
        return []
    return sorted((n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("NPU", 0) > 0),
                  key=lambda n: n["NodeID"])


def convert_on_cluster(job: OmJob, nodes: list[dict], timeout: float = 3600, files: ModelFiles | None = None,
                       log: Callable[[str], None] | None = None) -> Path:
    """``job``'s OM in the driver's cache: the cached one when an NPU node's `atc` would make it (same
    CANN version), else converted on the first node with `atc` (by node id)."""
    found = probe_nodes(nodes)
    with_atc = [n for n in found if n.exe]
    for node in with_atc or [None]:
        # With no node to convert (None), any cached OM will do, as convert_to_om does on a host without atc.
        cached = cached_om(job, node.version if node else ANY_VERSION)
        if cached is not None:
            return cached
    if not with_atc:
        hosts = ", ".join(sorted({n.host for n in found}))
        raise AtcError(f"atc not found on PATH on this host nor on the Ray cluster's {len(found)} NPU node(s) "
                       f"({hosts}): source {SET_ENV} (CANN's set_env.sh) before `ray start` on an NPU node, "
                       "or here, or install the CANN toolkit that provides it")
    node = with_atc[0]
    if log:
        log(f"atc is not on this host's PATH: converting {job.stem.name} on {node.host} "
            f"(Ray node {node.node_id[:8]}, CANN {node.version or 'version unknown'})")
    return _convert_on(node, job, timeout, files)


def probe_nodes(nodes: list[dict]) -> list[AtcNode]:
    """Each node's `atc` and CANN version, asked on the node itself: its PATH is the one `ray start` had."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    refs = [_on_node(ray, _atc_here, n["NodeID"]).remote() for n in nodes]
    try:
        answers = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except (GetTimeoutError, RayError) as e:
        raise AtcError(f"cannot ask the Ray cluster's NPU nodes for atc ({first_line(e)}); "
                       "check `ray status`") from None
    return [AtcNode(n["NodeID"], host, exe, version) for n, (host, exe, version) in zip(nodes, answers)]


def _convert_on(node: AtcNode, job: OmJob, timeout: float, files: ModelFiles | None) -> Path:
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    shipped = ship_model(files or model_files(job.onnx))
    ref = _on_node(ray, _convert_here, node.node_id).remote(shipped, job, timeout)
    try:
        result = ray.get(ref, timeout=timeout + PROBE_TIMEOUT_S)
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        raise AtcError(f"atc on {node.host} did not finish in {timeout:g} s for {job.stem.name}") from None
    except RayError as e:
        raise AtcError(f"atc on {node.host} for {job.stem.name}: {first_line(e)}") from None
    return _store(job, result, node)


def _store(job: OmJob, result: dict, node: AtcNode) -> Path:
    """The node's OM and sidecar where convert_to_om puts them: the OM first, the sidecar (which
    makes it count as cached) last; ATC's output beside them as ``<stem>.atc.log``."""
    folder = job.stem.parent
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{job.stem.name}.atc.log"
    atomic_write_text(log, f"# ran on {node.host} (Ray node {node.node_id})\n{result['log']}")
    if "error" in result:
        raise AtcError(f"{result['error'].replace(result['log_path'], str(log))} (atc ran on {node.host})")
    om = folder / result["om_name"]
    with atomic_file(om, "wb") as f:
        os.fchmod(f.fileno(), 0o644)  # ais_bench refuses group/other-writable model files
        f.write(result["om"])
    with atomic_file(om.with_suffix(".json"), "wb") as f:
        f.write(result["sidecar"])
    return om


def _on_node(ray, function, node_id: str):
    """``function`` as a Ray task pinned to ``node_id`` that takes no CPU (see the module's note)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(function).options(num_cpus=0, max_retries=0,
                                        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))


def _atc_here() -> tuple[str, str | None, str | None]:
    """On a node: its host name, the `atc` on its PATH and that atc's CANN version."""
    exe = shutil.which("atc")
    return socket.gethostname(), exe, atc_version(exe) if exe else None


def _convert_here(shipped, job: OmJob, timeout: float) -> dict:
    """On a node: ``job`` converted by its `atc` in a temporary folder; the OM's name and bytes and its
    sidecar's, or the one-line error; ATC's output either way."""
    onnx, _ = local_model(shipped)  # kept in the node's cache: a later conversion of it ships nothing
    exe = shutil.which("atc")
    if exe is None:
        raise AtcError(f"atc not found on PATH on {socket.gethostname()} any more: source {SET_ENV}")
    work = Path(tempfile.mkdtemp(prefix="runner-atc-"))
    here = dataclasses.replace(job, stem=work / job.stem.name)
    log = work / f"{job.stem.name}.atc.log"
    try:
        om = convert_job(here, onnx, exe, atc_version(exe), timeout)
        return {"om_name": om.name, "om": om.read_bytes(), "sidecar": om.with_suffix(".json").read_bytes(),
                "log": log.read_text(errors="replace")}
    except AtcError as e:
        return {"error": str(e), "log_path": str(log),
                "log": log.read_text(errors="replace") if log.exists() else ""}
    finally:
        shutil.rmtree(work, ignore_errors=True)
