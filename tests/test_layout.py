"""The package layout's promises: no import cycles, and no module reaches into another
module's ``_private`` names.

The import graph is read statically (``ast``), with the imports inside functions and the
lazy ``"minidalle.module:attr"`` references, so a cycle hidden behind a late import or a
module loaded by name is found too. The references in ``minidalle.plugin.builtins`` are
left out: they name the built-in components, stages and commands exactly as a third-party
plugin names its own, and the registry imports them only when one is used, after discovery
has finished (which is why components may use the process-wide registry).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import minidalle

PACKAGE = Path(minidalle.__file__).resolve().parent
LAZY_REF = re.compile(r"^(minidalle(?:\.\w+)+):[\w.]+$")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


PLUGIN_BOUNDARY = "minidalle.plugin.builtins"


def _imports(path: Path, modules: dict[str, Path], lazy: bool = True):
    """(target module, imported name or None) for every minidalle import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "minidalle":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield (sub, None) if sub in modules else (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "minidalle":
                    yield alias.name, None
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and lazy:
            match = LAZY_REF.match(node.value)
            if match and match.group(1) in modules:
                yield match.group(1), None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {target for target, _ in _imports(path, modules, lazy=name != PLUGIN_BOUNDARY)
                   if target != name}
            for name, path in modules.items()}


def test_the_import_graph_has_no_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt in graph and nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    found = []
    for name, path in modules.items():
        for target, imported in _imports(path, modules):
            if imported and imported.startswith("_") and not imported.startswith("__") \
                    and target != name:
                found.append(f"{name} imports {target}.{imported}")
    assert not found, "\n".join(found)


def test_every_folder_says_what_lives_there():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 12, f"{init.relative_to(PACKAGE.parent)}: no docstring"
