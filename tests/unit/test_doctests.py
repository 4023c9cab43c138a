"""Every docstring example of autoplan, autoplan.costmodels and autoplan.backends runs and
prints what it shows (an example that needs a process group, a GPU or a file on disk is
marked `# doctest: +SKIP`).

Modules are imported by their dotted names, as users import them: autoplan.costmodels lives
in costmodels/ and autoplan.backends in backends/ (pyproject's package-dir), which
`--doctest-modules` over the folders would import under the wrong names.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "autoplan": ROOT / "autoplan",
    "autoplan.costmodels": ROOT / "costmodels",
    "autoplan.backends": ROOT / "backends",
}
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
NEEDS_SKIP: dict[str, str] = {}


def _module_names() -> list[str]:
    names = set()
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.add(".".join((package, *parts)))
    return sorted(names)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(reason=f"needs # doctest: +SKIP: {NEEDS_SKIP[name]}", strict=True))
        if name in NEEDS_SKIP
        else name
        for name in _module_names()
    ],
)
def test_docstring_examples(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # doctest's debugger reads ~/.pdbrc: not this machine's
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report: list[str] = []
    failed = sum(runner.run(test, out=report.append).failed for test in finder.find(module, name))
    assert failed == 0, "".join(report)
