"""The shape of the code a newcomer reads: short functions, dependencies in one direction."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*ROOT.glob("spec_stream/**/*.py"), *ROOT.glob("huggingface/**/*.py"), *ROOT.glob("scripts/*.py"),
           ROOT / "dataset_tps.py"]
MAX_FUNCTION_LINES = 60  # def line to last line, docstring included


def test_every_function_fits_on_a_screen():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines: " + ", ".join(long)


def imports_of(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports, at module level or inside a function
    (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # from .x import y / from ..x import y
                base = path.parent.relative_to(ROOT).parts[: len(path.parent.relative_to(ROOT).parts) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            names.add(module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith(package)}


def test_generation_modules_import_each_other_without_cycles():
    """The loop never imports what sits above it (tree search, the fixed-shape runner), not
    even inside a function: a depth-first search over the imports finds no cycle."""
    package = "huggingface.transformers.generation"
    modules = {f"{package}.{p.stem}": p for p in (ROOT / "huggingface/transformers/generation").glob("*.py")}
    graph = {name: imports_of(path, package) & set(modules) for name, path in modules.items()}
    state = {}

    def visit(name, trail):
        if state.get(name) == "open":
            raise AssertionError("import cycle: " + " -> ".join(trail + [name]))
        if state.get(name) != "done":
            state[name] = "open"
            for dependency in graph[name]:
                visit(dependency, trail + [name])
            state[name] = "done"

    for name in graph:
        visit(name, [])
    assert f"{package}.tree_search" in graph[f"{package}.utils"]  # the search was found: the graph is real


def test_the_model_layer_never_imports_the_package_above_it():
    offenders = [str(path.relative_to(ROOT)) for path in ROOT.glob("huggingface/**/*.py")
                 if "spec_stream" in {name.split(".")[0] for name in imports_of(path, "spec_stream")}]
    assert not offenders
