"""The import rules of the layout (README "The data flow"), checked by walking every import of our
modules, function bodies included: leaf helpers < store, blocks < tasks < flows, service; no cycles."""
from __future__ import annotations

import ast
from pathlib import Path

from smsflow.settings import PROJECT_ROOT

PACKAGES = ("smsflow", "store", "blocks", "tasks", "flows", "service")
WIRING = {"smsflow.cli"}  # the command line wires everything together: it may import anything
FORBIDDEN = {  # package -> packages it must never import
    "smsflow": {"store", "blocks", "tasks", "flows", "service"},
    "store": {"blocks", "tasks", "flows", "service"},
    "blocks": {"tasks", "flows", "service"},
    "tasks": {"flows", "service"},
    "flows": {"service"},
    "service": {"flows"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (PROJECT_ROOT / pkg).rglob("*.py"):
            if "migrations" not in p.parts:
                out[_module_name(p)] = p
    return out


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules imported anywhere in the file (module level and function bodies)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {i for i in imports_of(p, known) if i != m and not m.startswith(i + ".") and i not in PACKAGES}
            for m, p in known.items()}


def test_layers_import_one_way():
    bad = sorted(f"{m} imports {i}" for m, deps in graph().items() if m not in WIRING
                 for i in deps if i.split(".")[0] in FORBIDDEN[m.split(".")[0]])
    assert bad == [], "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    cycles, seen, stack, on_stack = [], set(), [], set()

    def visit(m):
        seen.add(m)
        stack.append(m)
        on_stack.add(m)
        for d in sorted(g.get(m, ())):
            if d in on_stack:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in seen:
                visit(d)
        stack.pop()
        on_stack.discard(m)

    for m in sorted(g):
        if m not in seen:
            visit(m)
    assert cycles == [], "\n".join(cycles)
