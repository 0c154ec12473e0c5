"""The house: bam's packages form floors, and every import runs down them (docs/architecture.md).

Read from the source's own import statements, including the deferred ones inside functions (a
deferred import is still a dependency; it only moves its cost), so a cycle cannot hide in a
function body.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bam

PACKAGE = Path(bam.__file__).parent
# Bottom to top. A module may import from its own package or from a lower floor.
FLOORS = ("errors", "io", "modeling", "formats", "data", "eval", "train", "mix", "study", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def bam_imports(path: Path) -> set[str]:
    """The bam modules `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "bam"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "bam":
            for alias in node.names:  # `from bam.x import y` may name the module bam.x.y
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: bam_imports(path) - {name} for name, path in MODULES.items()}


def floor(module: str) -> int | None:
    """The floor of a module (bam/__init__.py, the package's face, has none)."""
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 else None


def test_every_module_lives_on_a_floor():
    homeless = [m for m in MODULES if m != "bam" and m.split(".")[1] not in FLOORS]
    assert not homeless, f"modules outside the floors {FLOORS}: {homeless}"


def test_imports_run_down_the_floors():
    upward = [f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
              for m, targets in GRAPH.items() if floor(m) is not None
              for t in sorted(targets) if floor(t) is not None and floor(t) > floor(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_graph_is_read():
    # The rules above hold vacuously on an empty graph: make sure it is the real one.
    assert "bam.modeling.config" in GRAPH["bam.modeling.model"]
    assert "bam.io.atomic" in GRAPH["bam.formats.model_dir"]
    assert floor("bam.cli.train") == len(FLOORS) - 1 and floor("bam.errors") == 0
