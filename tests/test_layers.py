"""Imports go one way, runner -> cluster -> tasks, and only cluster/ talks to Ray.

Read from the source with ``ast``, function-level imports included, so a lazy import
cannot hide a cycle.
"""
from __future__ import annotations

import ast

import pytest

from conftest import REPO

LAYERS = ("runner", "cluster", "tasks")  # each may import only those after it


def imports(package: str) -> dict[str, set[str]]:
    """module path -> the top-level names it imports."""
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


@pytest.mark.parametrize("package", LAYERS)
def test_imports_go_one_way(package):
    above = set(LAYERS[:LAYERS.index(package)])
    wrong = {module: sorted(names & above) for module, names in imports(package).items() if names & above}
    assert wrong == {}


@pytest.mark.parametrize("package", ["runner", "tasks"])
def test_only_cluster_imports_ray(package):
    assert [module for module, names in imports(package).items() if "ray" in names] == []


def test_runner_calls_no_ray_api():
    """Not even through a handle: no attribute ``.ray`` of a session in runner/."""
    for path in sorted((REPO / "runner").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.Attribute) and node.attr == "ray"), f"{path}:{node.lineno}"


def module_graph(package: str) -> dict[str, set[str]]:
    """``package.module`` -> the modules of the same package it imports (at any depth of the code)."""
    graph = {}
    for path in sorted((REPO / package).glob("*.py")):
        me = f"{package}.{path.stem}"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(package + "."):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith(package + ".")}
        graph[me] = targets - {me}
    return graph


@pytest.mark.parametrize("package", LAYERS)
def test_no_import_cycle_inside_a_package(package):
    graph = module_graph(package)
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            assert state.get(target) != 1, " -> ".join(path + [module, target])
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_the_command_and_a_failed_run_load_without_torch(tmp_path):
    """PyTorch costs a command 1.2-1.8 s to import (2 cores): the driver, the sweep and the
    pose worker import it only where a checkpoint is read or exported, so a command that
    fails on its inputs answers at once, and a --synthetic run on cached models never loads it."""
    import subprocess
    import sys

    probe = ("import sys, runpy\n"
             "import runner.driver, runner.bench, cluster.actor\n"
             "assert 'torch' not in sys.modules, 'imported torch'\n"
             "sys.argv = ['runner', '--dataroot', sys.argv[1], '--dets', 'd.json']\n"
             "try:\n"
             "    runpy.run_module('runner', run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    print('exit', e.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "nope")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == "exit 2 False", proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: missing dataroot {tmp_path / 'nope'}")
