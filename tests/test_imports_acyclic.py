"""Imports flow one way (STYLE.md section 9): the planner's modules, imports inside functions included, form
no cycle. Read from the source with `ast`, so nothing is imported and the check takes milliseconds."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "planner"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the planner modules it imports (anywhere in the file: module level, functions, branches).

    `from planner.train import stack` names the module planner.train.stack when that is a module, else
    the package planner.train; a relative import is resolved against the importing module's package."""
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import planner.train.stack as s` -> the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_the_modules_and_their_imports():
    graph = import_graph()
    assert len(graph) >= 40  # every planner module was read (a glob that silently found nothing would pass)
    assert "planner.train.stack" in graph["planner.train.session"] | graph["planner.train.harness"]
    assert "planner.exact_types" in graph["planner.exact"] and "planner.exact_types" in graph["planner.train.exact"]
    # an import inside a function counts: planner.exact reaches the heavy tracer only there
    assert "planner.train.exact" in graph["planner.exact"]


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_planner_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_qfit_run_modules_are_light_at_import():
    """`qfit run --help` and option errors stay instant: the modules behind `qfit run` (one GPU and the
    multi-GPU parent) import no torch, transformers, peft or bitsandbytes until training starts."""
    import os
    import subprocess
    import sys

    code = ("import sys; import planner.train.runner, planner.train.dist_run, planner.train.session, "
            "planner.train.run_report, planner.train.oom, planner.train.measure; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'pynvml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]"
