"""A real two-node Ray cluster on this host, the second node blind to chosen folders (a test helper).

    with two_nodes(env, hidden=[dataroot, models], second_path=fake_bin) as nodes, joined(nodes) as ray:
        head, second = wait_for_nodes(ray)          # this process is the driver, on the head
        ...   # or a CLI: subprocess.run([... "--address", nodes.address], env=dict(env, **nodes.driver_env))

The head is ``ray start --head``; the second node ``ray start --address`` run by
``unshare -m --propagation private`` after a tmpfs is mounted over each ``hidden`` folder,
so in its mount namespace (its raylet and every worker it starts) those folders are
empty, as on a host without the driver's storage. Each node offers one NPU slot
(``--resources '{"NPU": 1}'``) and one CPU. ``second_path`` goes first on PATH of the
second node only (the fake `atc`), ``second_env`` into its environment only.
``second_hostname`` gives the second node a host name of its own (``unshare -u`` too):
without it both nodes are one host, whose chips two NPU workers would share (the pool
refuses that: ``cluster.pool.shared_chips`` groups workers by host name).

Token authentication: both nodes run with ``RAY_AUTH_MODE=token`` and the user's default
token (``~/.ray/auth_token``, made with ``ray get-auth-token --generate`` when missing);
a driver joins with ``cluster.driver_env`` set. A private token file would not do for a
driver in the test process: Ray's token loader caches the token an earlier ``ray.init``
read.

Cleanup without ``ray stop`` (it would stop every Ray on the host, other tests' too): each
``ray start --block`` is started as the leader of its own session; SIGTERM makes it stop
the processes it started, then whatever is left in its session (raylet's workers put
themselves in process groups of their own, but keep the session) is killed with SIGKILL.
Both nodes get their own ``--temp-dir``, so ``ray_current_cluster`` (which a plain
``ray.init()`` reads to join a cluster) is never written to /tmp/ray.
"""
from __future__ import annotations

import functools
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))
STARTED = "Ray runtime started."
HEAD_RESOURCE = "node:__internal_head__"


@dataclass
class TwoNodes:
    address: str  # HOST:PORT of the head's GCS
    driver_env: dict[str, str]  # what a driver process needs in its environment to join
    temp_dir: Path  # both nodes' Ray temp dir (sessions, logs)


@functools.cache
def unshare_unavailable() -> str | None:
    """Why a node cannot get a mount namespace with folders hidden here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root: the second node hides folders with unshare -m and mount -t tmpfs"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not on PATH"
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f"mount -t tmpfs tmpfs {shlex.quote(folder)}"],
                              capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[0]
        return f"unshare -m / mount -t tmpfs not allowed here (a container without CAP_SYS_ADMIN?): {why}"
    return None


@functools.cache
def uts_unavailable() -> str | None:
    """Why a node cannot get a host name of its own here (``unshare -u``), or None when it can."""
    proc = subprocess.run(["unshare", "-u", "hostname", "rn2-probe"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[0]
        return f"unshare -u / hostname not allowed here: {why}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def two_nodes(env: dict[str, str], hidden: Sequence[str | Path] = (), second_path: str | Path | None = None,
              second_env: dict[str, str] | None = None, timeout: float = 60,
              second_hostname: str | None = None) -> Iterator[TwoNodes]:
    """Start the head and the second node (see the module's note); skip the test where the second
    node cannot hide folders (or, with ``second_hostname``, cannot have a host name of its own).
    ``env``: both nodes' environment (PYTHONPATH to import the repo)."""
    why = unshare_unavailable() or (second_hostname and uts_unavailable())
    if why:
        pytest.skip(why)
    temp = Path(tempfile.mkdtemp(prefix="rn2-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    node_env = {**{k: v for k, v in env.items() if not k.startswith("RAY_")}, "RAY_AUTH_MODE": "token"}
    _ensure_token(node_env)
    address = f"{_host_ip()}:{free_port()}"
    # Ports Ray would otherwise take by default (the dashboard agent's 52365) clash between the two nodes
    # and with any other Ray on this host: each node gets free ones.
    common = ["--num-cpus=1", '--resources={"NPU": 1}', f"--temp-dir={temp}", "--disable-usage-stats", "--block"]
    started: list[subprocess.Popen] = []
    try:
        started.append(_start([RAY, "start", "--head", f"--port={address.rsplit(':', 1)[1]}",
                               "--include-dashboard=false", f"--dashboard-port={free_port()}",
                               f"--dashboard-agent-listen-port={free_port()}", *common],
                              node_env, temp / "head.log", timeout))
        second = dict(node_env, **(second_env or {}))
        if second_path:
            second["PATH"] = f"{second_path}{os.pathsep}{second['PATH']}"
        mounts = [f"mount -t tmpfs tmpfs {shlex.quote(str(folder))}" for folder in hidden]
        if second_hostname:
            mounts.append(f"hostname {shlex.quote(second_hostname)}")
        script = " && ".join([*mounts, "exec " + shlex.join([RAY, "start", f"--address={address}",
                                                               f"--dashboard-agent-listen-port={free_port()}",
                                                               *common])])
        started.append(_start(["unshare", "-m", *(["-u"] if second_hostname else []), "--propagation", "private",
                               "sh", "-c", script], second, temp / "second.log", timeout))
        yield TwoNodes(address, {"RAY_AUTH_MODE": "token"}, temp)
    finally:
        for proc in reversed(started):
            _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


@contextmanager
def joined(nodes: TwoNodes) -> Iterator[object]:
    """This process as a driver of ``nodes`` (``ray.init(address=...)``); the Ray module.

    Ray reads RAY_AUTH_MODE into its config once per process (and a local ``ray.init()``
    turns it on for the process): the config is read again after the variable is set, and
    again once it is restored, as Ray's own tests do (``ray._private.authentication_test_utils``).
    """
    import ray
    from ray._raylet import Config

    with pytest.MonkeyPatch.context() as mp:
        for key, value in nodes.driver_env.items():
            mp.setenv(key, value)
        for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):  # the nodes use ~/.ray/auth_token
            mp.delenv(key, raising=False)
        Config.initialize("")
        ray.init(address=nodes.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            yield ray
        finally:
            ray.shutdown()
    Config.initialize("")


def wait_for_nodes(ray, count: int = 2, timeout: float = 60) -> list[dict]:
    """The cluster's live nodes once ``count`` are up, the head first."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= count:
            return sorted(alive, key=lambda n: HEAD_RESOURCE not in n["Resources"])
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(alive)} of {count} Ray nodes up after {timeout} s")
        time.sleep(0.1)


def _host_ip() -> str:
    """The address `ray start` would pick for this host (its default route's), so both nodes agree."""
    import ray._private.services as services

    return services.get_node_ip_address()


def _ensure_token(env: dict[str, str]) -> None:
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=60)


def _start(argv: list[str], env: dict[str, str], log: Path, timeout: float) -> subprocess.Popen:
    """``argv`` (a ``ray start --block``) as the leader of a new session, once it says Ray started."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while STARTED not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            tail = log.read_text(errors="replace")[-2000:]
            raise AssertionError(f"{shlex.join(argv[:4])} did not start (exit {proc.returncode}):\n{tail}")
        time.sleep(0.1)
    return proc


def _stop(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM to the ``ray start --block`` (it stops what it started), then SIGKILL to its session."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in _session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue  # gone meanwhile


def _session_members(sid: int) -> list[int]:
    """Processes whose session id is ``sid`` (field 6 of /proc/PID/stat)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: count fields after its last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and int(entry.name) != os.getpid():
            members.append(int(entry.name))
    return members
