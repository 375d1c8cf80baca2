"""The package's shape: no import cycles, one method table that everything reads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lrqat
from lrqat.methods import METHODS

PACKAGE = Path(lrqat.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(tree: ast.AST, modules: set[str]) -> set[str]:
    """The lrqat modules a file imports anywhere (functions included), except under
    `if TYPE_CHECKING:` (annotations only, never executed)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if is_type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(ast.parse(path.read_text()), set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_the_package_imports_no_module_in_a_cycle():
    graph = import_graph()
    assert "lrqat.methods" in graph and "lrqat.layers.lrqat" in graph  # the walk sees the package
    # only the package's front door imports the package root
    assert not [m for m, deps in graph.items() if "lrqat" in deps and m != "lrqat"]
    cycle = find_cycle({m: deps - {"lrqat"} for m, deps in graph.items()})
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_lrqat_works_in_a_fresh_interpreter():
    proc = subprocess.run([sys.executable, "-c", "import lrqat; print(len(lrqat.METHODS))"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == len(METHODS)


def test_every_method_is_one_entry_read_everywhere():
    """The CLI's choices, the report's names and the learning-rate defaults all come from
    the table: a registered method is usable by name with nothing else edited."""
    from lrqat.cli import build_parser
    from lrqat.spec import RunSpec

    assert list(METHODS) == ["rtn", "gptq", "block-ap", "peqa", "naive-lora", "qat", "lrqat", "float-lora"]
    for name, method in METHODS.items():
        args = build_parser().parse_args(["quantize", "--method", name])
        assert args.method == name
        resolved = RunSpec(method=name).resolve()
        assert (resolved.spec.train.lr, resolved.spec.train.lr_scales) == (method.lr, method.lr_scales)
        assert method.trained == (method.lr > 0 or method.lr_scales > 0)
