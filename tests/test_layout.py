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


# Layers, lowest first: a module imports only modules of its own layer or below (function-level imports
# included). The most specific name wins ("ulsexport.runtime.ort" over "ulsexport.runtime"). A new module
# gets a line here; a test fails until it has one.
LAYERS = [
    # 0: no ulsexport imports of note
    ("ulsexport.errors", 0), ("ulsexport.progress", 0), ("ulsexport.compat", 0), ("ulsexport.version", 0), ("ulsexport.processes", 0),
    ("ulsexport.runtime.base", 0), ("ulsexport.engine.ops", 0), ("ulsexport.export.ort_fusions", 0),
    # 1: files, settings, text
    ("ulsexport.precision", 1), ("ulsexport.outputs", 1), ("ulsexport.tokenizer", 1), ("ulsexport.artifact", 1),
    ("ulsexport.plan", 1), ("ulsexport.plan.positional", 1), ("ulsexport.export", 1),
    ("ulsexport.runtime", 1), ("ulsexport.runtime.kernels", 1), ("ulsexport.engine.library", 1),
    ("ulsexport.engine.profiles", 1),
    # 2-3: model families and checkpoints
    ("ulsexport.families", 2), ("ulsexport.gguf", 2), ("ulsexport.checkpoint", 3),
    # 4: models in PyTorch, pruning, quality
    ("ulsexport.models", 4), ("ulsexport.prune", 4), ("ulsexport.quality", 4),
    # 5-6: data-driven plans, healing, the runtimes
    ("ulsexport.plan.scoring", 5), ("ulsexport.plan.compare", 5), ("ulsexport.heal.corpus", 5),
    ("ulsexport.heal.samples", 5), ("ulsexport.heal.distributed", 5), ("ulsexport.runtime.pytorch", 5), ("ulsexport.runtime.speculative", 5),
    ("ulsexport.runtime.ort_session", 5), ("ulsexport.runtime.ort_streams", 5), ("ulsexport.runtime.genai", 5),
    ("ulsexport.heal", 6), ("ulsexport.runtime.ort_decoder", 6), ("ulsexport.runtime.tensorrt", 6),
    ("ulsexport.runtime.decode_engine", 6), ("ulsexport.runtime.ort_multi_depth", 7), ("ulsexport.runtime.ort", 8),
    # 9: exporting; 10: validating, serving one model, TensorRT graphs
    ("ulsexport.export.trace", 9), ("ulsexport.export.genai", 9), ("ulsexport.export.multi_depth", 9), ("ulsexport.export.stage", 9),
    ("ulsexport.validate", 10), ("ulsexport.serve.generate_model", 10), ("ulsexport.engine.onnx_target", 10),
    ("ulsexport.generate", 10),
    # 11-12: repositories, servers, engines
    ("ulsexport.serve.repository", 11), ("ulsexport.engine.build", 11), ("ulsexport.serve", 12),
    ("ulsexport.serve.server", 12), ("ulsexport.engine", 12), ("ulsexport.engine.triton", 12),
    # 13: the whole pipeline; 14: the command line; the package's own front door
    ("ulsexport.recipe", 13), ("ulsexport.testing", 13), ("ulsexport.cli", 14), ("ulsexport", 15),
]


def layer_of(module: str) -> int | None:
    """The layer of `module`: its own line, else its package's (the bare package's line is its own only)."""
    table = dict(LAYERS)
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in table:
            return table[".".join(parts[:n])]
    return table.get(module)


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({layer_of(m)}) -> {d} ({layer_of(d)})" for m, targets in graph.items() for d in targets
                  if layer_of(d) > layer_of(m))


def test_no_import_points_up():
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"give these modules a layer in LAYERS: {unplaced}"
    assert not upward(graph), upward(graph)
    assert upward({"ulsexport.errors": {"ulsexport.cli"}, "ulsexport.cli": {"ulsexport.errors"}}) == [
        "ulsexport.errors (0) -> ulsexport.cli (14)"]
    assert layer_of("ulsexport.somewhere_new") is None and layer_of("ulsexport.heal.train") == 6


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


def test_the_manifest_is_read_only_through_artifact():
    """`Artifact.open` is the one reader of ulsexport.json: no module but artifact.py calls read_manifest."""
    callers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if p.name != "artifact.py" and re.search(r"\bread_manifest\(", p.read_text()))
    assert callers == []


def test_artifact_types_what_crosses_modules(tmp_path):
    from ulsexport.artifact import Artifact, write_manifest
    from ulsexport.errors import UserError

    plain = Artifact.open(tmp_path)
    assert plain.record is None and plain.manifest == {} and plain.trained_depths == [] and plain.onnx == {}
    write_manifest(tmp_path, {"kind": "onnx", "multi_depth": True, "onnx": {"file": "model.onnx"}, "kept": [0, 3]})
    export = Artifact.open(tmp_path)
    assert (export.kind, export.multi_depth, export.kept, export.onnx["file"]) == ("onnx", True, [0, 3], "model.onnx")
    assert export.path("model.onnx") == (tmp_path / "model.onnx").resolve()
    try:
        export.path("../elsewhere.onnx")
    except UserError as exc:
        assert "lies outside" in str(exc)
    else:
        raise AssertionError("a path out of the artifact was accepted")
    write_manifest(tmp_path, {"kind": "onnx", "onnx": "not a record"})
    assert Artifact.open(tmp_path).onnx == {}   # a manifest is input: an odd type is no record


def test_the_tests_mirror_the_package():
    """tests/<package>/ holds the tests of ulsexport/<package>/; no test file sits in a folder the package lacks."""
    tests = Path(__file__).parent
    folders = {p.parent.relative_to(tests) for p in tests.rglob("test_*.py")} - {Path(".")}
    assert folders and all((PACKAGE / folder / "__init__.py").is_file() for folder in folders), folders
    names = [p.name for p in tests.rglob("*.py") if p.name != "conftest.py"]
    assert len(names) == len(set(names)), "test modules are imported by name: keep their names unique"
