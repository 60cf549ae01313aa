"""The import layering: the serving core (ranker/*.py) knows nothing of HTTP, training or
evaluation; the HTTP app (server.api) and training/evaluation sit on the core; the command
line and the benchmark (server/*.py) sit above all. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Layer of each package, lowest first, and the layers each may import from.
LAYERS = {
    "ranker": set(),  # the serving core
    "ranker.training": {"ranker"},
    "ranker.evaluation": {"ranker", "ranker.training"},
    "server.api": {"ranker"},
    "server": {"ranker", "ranker.training", "ranker.evaluation", "server.api"},
}


def modules() -> dict[str, Path]:
    out = {}
    for top in ("ranker", "server"):
        for path in (REPO / top).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer_of(module: str, mods: dict[str, Path]) -> str:
    """A module's package (a package's own __init__ is in itself)."""
    return module if mods[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("ranker", "server")}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imports(p) if i in mods} for m, p in mods.items()}


def test_no_package_imports_one_above_it():
    mods = modules()
    bad = []
    for m, targets in graph().items():
        src = layer_of(m, mods)
        for t in targets:
            dst = layer_of(t, mods)
            if dst != src and dst not in LAYERS[src]:
                bad.append(f"{m} -> {t}")
    assert not bad, bad


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in g[m]:
            if state.get(t) == 1:
                raise AssertionError(" -> ".join(path + [m, t]))
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in g:
        if m not in state:
            visit(m, [])


def test_the_layer_rules_see_every_module():
    mods = modules()
    assert {layer_of(m, mods) for m in mods} == set(LAYERS)
    assert "ranker.policy" in mods and "server.api.serving_chat" in mods
