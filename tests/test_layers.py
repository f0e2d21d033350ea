"""The packages' layers: the model library stands alone, the client needs neither the model nor Ray, the job
system (`pusa_jobs`) serves the Serve app and the batch without importing either, the batch does not import
the Serve app, no two packages import each other (directly or around a longer cycle), and the `pusa`
command loads only the subcommand it runs."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("pusa_model", "pusa_client", "pusa_batch", "pusa_cli", "pusa_jobs", "deployments")


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level packages each module of `package` imports, at module level or inside a function."""
    assert (ROOT / package / "__init__.py").is_file(), f"{package} is not a package of the project"
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize(("package", "forbidden"), [
    ("pusa_model", {"ray", "deployments", "pusa_batch", "pusa_client", "pusa_cli", "pusa_jobs"}),
    ("pusa_client", {"ray", "torch", "deployments", "pusa_batch", "pusa_cli", "pusa_jobs"}),
    ("pusa_jobs", {"deployments", "pusa_batch", "pusa_client", "pusa_cli"}),
    ("pusa_batch", {"deployments", "pusa_client", "pusa_cli"}),
])
def test_a_package_imports_nothing_above_it(package, forbidden):
    offending = {module: sorted(names & forbidden) for module, names in imported_packages(package).items()
                 if names & forbidden}
    assert offending == {}


def package_graph() -> dict[str, set[str]]:
    """For each package of the project, the other packages of the project its modules import."""
    graph: dict[str, set[str]] = {}
    for package in PROJECT:
        imported = set().union(*imported_packages(package).values())
        graph[package] = (imported & set(PROJECT)) - {package}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle through the graph's nodes, each once (rotated to start at its smallest node)."""
    found: set[tuple[str, ...]] = set()

    def walk(path: list[str]) -> None:
        for successor in sorted(graph[path[-1]]):
            if successor == path[0]:
                found.add(tuple(path))
            elif successor > path[0] and successor not in path:  # each cycle from its smallest node only
                walk([*path, successor])

    for node in sorted(graph):
        walk([node])
    return [[*cycle, cycle[0]] for cycle in sorted(found)]


def test_cycles_finds_every_cycle_once():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": {"a", "c"}, "c": set()}) == [["a", "b", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_two_packages_import_each_other():
    graph = package_graph()
    assert cycles(graph) == [], {package: sorted(imported) for package, imported in graph.items()}


def loaded_after(statement: str, modules: tuple[str, ...] = ("torch", "ray")) -> dict[str, bool]:
    code = f"import sys\n{statement}\nimport json\nprint(json.dumps({{m: m in sys.modules for m in {modules!r}}}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_client_and_the_request_fields_load_neither_torch_nor_ray():
    assert loaded_after("import pusa_client.cli, pusa_model.request_options") == {"torch": False, "ray": False}


def test_pusa_client_runs_without_torch_or_ray():
    statement = ("from pusa_cli import main\nsys.argv = ['pusa', 'client', 'get', 'video_x', '--url', 'http://127.0.0.1:9']\n"
                 "assert main(sys.argv[1:]) == 4")  # unreachable: exit 4, after the command ran
    assert loaded_after(statement) == {"torch": False, "ray": False}


def test_building_the_app_and_starting_router_and_runner_do_not_load_the_model_code():
    """Serve's build task imports `deployments.app` and the Router's and Runner's replicas their modules on
    every deploy: diffusers, transformers and torchao (seconds of imports, more from a cold disk) load only in
    the model replicas' constructors and in the processes that run a batch."""
    assert loaded_after("import deployments.app, deployments.router, deployments.runner",
                        ("diffusers", "transformers", "torchao")) == {
        "diffusers": False, "transformers": False, "torchao": False}
