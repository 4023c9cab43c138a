"""The layers of the tree, as autoplan/__init__.py lists them: a module imports only modules
of its own layer or of layers before it, function-level imports included, so planning never
reaches into measurement or running, and there is no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {
    "autoplan": ROOT / "autoplan",
    "autoplan.costmodels": ROOT / "costmodels",
    "autoplan.backends": ROOT / "backends",
}
LAYERS = [
    "autoplan.errors",
    "autoplan.costmodels.devices",
    "autoplan.schema",
    "autoplan.zoo",
    "autoplan.analysis",
    "autoplan.costmodels",
    "autoplan.planner",
    "autoplan.backends",
    "autoplan.runtime",
    "autoplan.measure",
    "autoplan.bench",
    "autoplan.cli",
    "autoplan",
]
"""Earliest first; a module belongs to the longest prefix that names it. `autoplan` itself (the
facade: plan, explain, parallelize) comes last. Datasheet presets (costmodels.devices) are data
the schema's cluster presets read."""


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "autoplan" and parts and parts[0] in ("costmodels", "backends"):
                continue
            found[name] = path
    return found


def _layer(module: str) -> int:
    return max(
        (index for index, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")),
        key=lambda index: len(LAYERS[index]),
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    targets = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    resolved = set()
    for target in targets:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name and target.startswith("autoplan"):
            resolved.add(target)
    return resolved


def test_no_module_imports_a_later_layer():
    modules = _modules()
    wrong = [
        f"{name} -> {target}"
        for name, path in modules.items()
        for target in _imports(name, path, modules)
        if _layer(target) > _layer(name) and not name.startswith(target + ".")
    ]
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_there_is_no_import_cycle():
    modules = _modules()
    graph = nx.DiGraph(
        (name, target)
        for name, path in modules.items()
        for target in _imports(name, path, modules)
        if not name.startswith(target + ".")
    )  # a module may import its own package's __init__
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_the_check_sees_function_level_imports():
    modules = _modules()
    assert "autoplan.planner.planning" in _imports("autoplan", modules["autoplan"], modules)  # lazy, inside plan()


@pytest.mark.distributed  # imports autoplan in a fresh interpreter
def test_importing_autoplan_changes_nothing_global():
    """No module of ours touches the process at import (torch's own filters come first): no
    warning filter, stdout where it was."""
    import subprocess
    import sys

    code = (
        "import os, warnings, torch, torch.distributed.fsdp, torch.distributed.pipelining, pulp; "
        "before = list(warnings.filters); fd = os.dup(1); "
        "import autoplan, autoplan.planner.solver, autoplan.backends.runner, autoplan.runtime.parallelize; "
        "assert warnings.filters == before, 'warning filters changed'; "
        "assert os.fstat(1).st_ino == os.fstat(fd).st_ino, 'stdout moved'; print('clean')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "clean", result.stderr[-2000:]
