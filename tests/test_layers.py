"""The dependency direction of docs/architecture.md, as plain data: every ``import`` of
every zexec module (those inside functions too) goes down the layers, never up."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "zexec")

#: bottom to top; a module imports only its own layer's and lower ones
LAYERS = [
    {"errors", "protocol", "wire", "serialize", "shm", "connection", "_proc", "futures",
     "progressbar", "forked", "logforward"},
    {"controller", "engine", "engineset", "client"},  # beside each other: see SIDES
    {"executor"},
    {"commands"},  # the process commands: `zexec controller|engine`, forked or spawned
    {"cluster", "launch"},
    {"__main__"},  # the user's command line
]
#: the parts of one layer that never import each other (the controller is a package)
SIDES = {"controller": "controller", "engine": "engine", "engineset": "engine", "client": "client"}


def _part(module: str) -> str:
    """``zexec.controller.hub`` -> ``controller``; ``zexec.cluster`` -> ``cluster``."""
    return module.split(".")[1]


def _imports(path: str, module: str) -> set[str]:
    """The zexec modules ``module`` imports, at its top or inside a function."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # ``from . import executor`` names modules; ``from .errors import X`` one
            names = [f"{name}.{a.name}" for a in node.names] if node.module is None else [name]
        else:
            continue
        found.update(n for n in names if n.startswith("zexec."))
    return found


def _modules() -> dict[str, str]:
    """Every module of the package but its facade (``zexec/__init__.py`` loads the public
    names lazily, from the top): module name -> path."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = ["zexec", *os.path.relpath(path, PACKAGE)[:-3].split(os.sep)]
            if parts[-1] == "__init__":
                parts.pop()
            if len(parts) > 1:
                found[".".join(parts)] = path
    return found


def _layer(part: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"zexec/{part}: a new module; give it its layer in LAYERS "
                         "(and in docs/architecture.md's layout)")


def test_every_module_imports_only_its_own_layer_and_lower_ones():
    wrong = []
    for module, path in sorted(_modules().items()):
        part = _part(module)
        for target in sorted(_imports(path, module)):
            other = _part(target)
            if other == part:
                continue
            if _layer(other) > _layer(part):
                wrong.append(f"{module} imports {target}, a higher layer")
            elif part in SIDES and other in SIDES and SIDES[part] != SIDES[other]:
                wrong.append(f"{module} imports {target}, beside it")
    assert not wrong, "\n".join(wrong)


def test_the_command_line_is_imported_by_nothing_in_zexec():
    # the forked cluster processes once ran ``zexec.__main__.main``: cluster importing
    # the command line that sits above it (``zexec local`` uses LocalCluster)
    users = [m for m, path in _modules().items() if "zexec.__main__" in _imports(path, m)]
    assert users == []


@pytest.mark.timeout(60)
def test_a_forked_cluster_process_runs_its_command_without_the_command_line(tmp_path):
    # what LocalCluster(start_method="fork") hands to zexec.forked.start, run here in a
    # fresh interpreter (no fork): it runs `zexec engine ...` as `python -m zexec engine`
    # does (same one-line error, same status) and never loads zexec.__main__
    missing = str(tmp_path / "nowhere.json")
    script = f"""
import sys
from zexec import cluster, forked

runs = []
forked.start = lambda run, log_path, args=None: runs.append(run)
c = cluster.LocalCluster(1, start_method="fork")
c.dir = {str(tmp_path)!r}
c._fork("engines", ["engine", "--connection-file", {missing!r}])
c.procs.clear()
rc = runs[0]()
print(rc, "zexec.__main__" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=50,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.stdout.split() == ["1", "False"], (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines() == [
        f"zexec engine: error: no connection file {missing} (a controller writes it: "
        "zexec controller --connection-file PATH)"], r.stderr
