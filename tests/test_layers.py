"""The package's layers (fishmp/__init__.py): every import of a fishmp module, module-level or inside a function, goes
to its own layer or one below it, and no import cycle ties modules together. Read from the source (ast), so a lazy
import that hides a cycle counts too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fishmp"
# Bottom to top. A module's layer is its folder; at the package root, config.py is the bottom and the rest are surfaces.
LAYERS = ["config", "job", "planning", "engines", "worker", "backends", "running", "surfaces"]
MAX_ROOT_MODULES = 7  # besides __init__.py and __main__.py


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] not in LAYERS):
        return "config" if module == "fishmp.config" else "surfaces"
    return parts[1] if parts[1] in LAYERS else "surfaces"


def import_edges() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else (node.module or "")
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t not in (mod, "fishmp"):
                    edges[mod].add(t)
    return edges


def test_every_import_goes_to_its_own_layer_or_below() -> None:
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = sorted(f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
                    for m, targets in import_edges().items() for t in targets
                    if rank[layer_of(t)] > rank[layer_of(m)])
    assert upward == []


def test_no_import_cycles() -> None:
    edges = import_edges()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_package_root_holds_few_modules() -> None:
    root = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def test_each_layer_says_what_it_may_import() -> None:
    for layer in LAYERS[1:-1]:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text(encoding="utf-8"))) or ""
        assert "May import" in doc.split("\n\n")[0], layer
