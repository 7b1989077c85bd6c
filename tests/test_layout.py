"""The layout a newcomer reads: no import cycles between nash's modules, and a module map in
docs/layout.md that lists exactly the modules in the tree."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"nash": "nash", "nash.judges": "judges", "nash.flows": "flows"}


def _modules() -> dict[str, Path]:
    out = {}
    for top, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [*top.split("."), *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top or inside a function."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from nash import evaluation` imports the module nash.evaluation
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules():
    graph = import_graph()
    assert len(graph) > 40 and graph["nash.iteration"], "the graph found no modules or no imports"
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nash_never_imports_prefect_at_module_level():
    for name, path in _modules().items():
        if name.startswith("nash") and not name.startswith("nash.flows"):
            top = ast.parse(path.read_text(encoding="utf-8")).body
            imported = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
            imported += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
            assert not any(m.split(".")[0] == "prefect" for m in imported), name


def test_the_module_map_lists_exactly_the_modules_in_the_tree():
    text = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\|\s*`([^`]+\.py)`", text, re.M)
    tree = sorted(str(p.relative_to(ROOT)) for p in _modules().values())
    assert sorted(listed) == tree
    assert len(listed) == len(set(listed))
