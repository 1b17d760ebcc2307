"""The package's shape: dependencies point one way (no import cycle, function-level imports included)."""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "ulsexport"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the ulsexport modules it imports anywhere in its body."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    targets.add(candidate if candidate in files else base)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "ulsexport.export.trace" in graph and "ulsexport.runtime.ort" in graph["ulsexport.export.trace"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_builders_and_runtimes_are_listed_only_in_their_registries():
    """A builder or runtime class is named, as a string to import, in its registry and nowhere else (a module's
    `__all__`, its list of exports, aside)."""
    listed = {"export_onnx": "export/__init__.py", "build_genai": "export/__init__.py",
              "OrtRuntime": "runtime/__init__.py", "GenaiRuntime": "runtime/__init__.py",
              "TorchRuntime": "runtime/__init__.py"}
    for name, home in listed.items():
        quoted = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                  if f'"{name}"' in re.sub(r"__all__ = \[.*?\]", "", p.read_text(), flags=re.S)]
        assert quoted == [home], (name, quoted)


def test_every_top_level_name_resolves():
    import ulsexport

    for name in ulsexport.__all__:
        assert getattr(ulsexport, name) is not None, name
