"""The package's layers point one way: the import graph of eenn's modules (every import, also
those inside functions) has no cycle, and nothing on the inference or deployment side reaches a
training method. The top-level ``eenn/__init__.py`` (the facade that gathers the public names)
is left out: every module may be imported through it."""
import ast
from pathlib import Path

import eenn

ROOT = Path(eenn.__file__).parent
# Inference and deployment: deciding exits, running networks, exporting, serving.
INFERENCE = ("eenn.engine", "eenn.staged", "eenn.manifest", "eenn.exporter", "eenn.inference", "eenn.outputs", "eenn.policies",
             "eenn.serve", "eenn.functional", "eenn.network", "eenn.heads", "eenn.trace", "eenn.cost",
             "eenn.backbones", "eenn.data", "eenn.io")
TRAINING = ("eenn.objectives", "eenn.trainer", "eenn.train_config", "eenn.callbacks")


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_nodes(tree):
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only, never imported)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _graph() -> dict[str, set[str]]:
    modules = {_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
                # "from .pkg import sub" names a module when sub is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t in modules and t != "eenn" and t != mod:
                    graph[mod].add(t)
    return graph


def _reach(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles():
    graph = _graph()
    cyclic = {m: sorted(t for t in graph[m] if m in _reach(graph, t)) for m in graph if m in _reach(graph, m)}
    assert not cyclic, f"modules on an import cycle (module: the imports that lead back to it): {cyclic}"


def test_inference_never_imports_a_training_method():
    graph = _graph()
    for mod in graph:
        if mod.startswith(INFERENCE):
            bad = sorted(t for t in _reach(graph, mod) if t.startswith(TRAINING))
            assert not bad, f"{mod} reaches {bad}"
