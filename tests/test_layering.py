"""The package layers import only downward: commands -> fleet -> devices -> export -> runtime.

Every module under runtime/, export/, devices/ and commands/ is parsed (not imported, so optional
backends do not matter) and each import, relative ones resolved, is checked against the layer order:
runtime imports no stoprt.export/devices/fleet/commands/cli; export none of devices/fleet/commands/cli;
devices none of fleet/commands/cli; fleet none of commands/cli. The command layer (and the top-level ``cli``) may import anything below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("stoprt.cli", "stoprt.cli_args", "stoprt.commands")
FORBIDDEN = {"runtime": ("stoprt.export", "stoprt.devices", "stoprt.fleet", *TOP),
             "export": ("stoprt.devices", "stoprt.fleet", *TOP),
             "devices": ("stoprt.fleet", *TOP),
             "fleet": TOP,
             "commands": ()}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["stoprt", *parts])


def imports_of(path: Path, text: str | None = None) -> set[str]:
    """Absolute names of everything ``path`` (or ``text``, as that module) imports; ``from . import x``
    gives ``package`` and ``package.x``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from .. import export`
    return found


def _below(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_relative_imports_resolve():
    found = imports_of(ROOT / "export" / "importers" / "nir.py")
    assert any(_below(n, "stoprt.runtime") for n in found)
    assert "stoprt.export.importers._common" in found or "stoprt.export.importers" in found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downward(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no modules under {layer}/"
    bad = [f"{path.relative_to(ROOT)} imports {name}" for path in files for name in sorted(imports_of(path))
           if any(_below(name, prefix) for prefix in FORBIDDEN[layer])]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_checker_sees_an_upward_import():
    """The check can fail: relative upward imports in a runtime module resolve to the layer above."""
    probe = ROOT / "runtime" / "stream" / "probe.py"
    assert "stoprt.export.bundle" in imports_of(probe, "from ...export import bundle\n")
    assert "stoprt.devices" in imports_of(probe, "def f():\n    from ... import devices\n")


def _module_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (packages' ``__init__`` left out: a module may use its package)."""
    files = [p for layer in FORBIDDEN for p in (ROOT / layer).rglob("*.py") if p.name != "__init__.py"]
    names = {_module_name(p): p for p in files}
    return {name: {n for n in imports_of(path) if n in names and n != name} for name, path in names.items()}


def test_no_two_modules_import_each_other():
    """E.g. a bundle holds a model file, so model_file does not import bundle (the loader of both,
    export/loading.py, sits above them)."""
    graph = _module_graph()
    assert "stoprt.export.bundle" in graph and "stoprt.export.model_file" in graph["stoprt.export.bundle"]
    cycles = [f"{a} <-> {b}" for a in graph for b in graph[a] if a < b and a in graph[b]]
    assert not cycles, cycles
