"""The package layout (docs/layout.md): every import, lazy ones included, points to the same or a lower
layer, and no module imports itself back through a chain of imports."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "latentcm"

# layer of each top-level module or subpackage of latentcm (docs/layout.md)
LAYERS = {
    "__init__": 0, "errors": 0, "defaults": 0, "schedules": 0, "parameterization": 0, "guidance": 0,
    "solvers": 0, "world": 0, "styles": 0, "images": 0, "offline": 0, "registry": 0, "files": 0,
    "models": 1, "sampling": 2, "bundle": 3, "export": 4, "training": 5,
    "teacher_build": 6, "evaluation": 6, "cli": 7, "serve": 7,
}
# the pure math: nothing but torch/numpy and each other
MATH = ("schedules", "parameterization", "solvers", "guidance", "sampling.lcm")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name or "__init__"] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The latentcm modules ``name`` imports, anywhere in the file (function-level imports included)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "__init__":
        package = []
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name.removeprefix("latentcm.") for a in node.names if a.name.startswith("latentcm")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("latentcm"):
                mod = node.module.removeprefix("latentcm").lstrip(".")
            else:
                continue
            targets = [f"{mod}.{a.name}".lstrip(".") if f"{mod}.{a.name}".lstrip(".") in modules else mod
                       for a in node.names]
        else:
            continue
        out |= {t or "__init__" for t in targets if (t or "__init__") in modules}
    return out - {name}


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def _layer(name: str) -> int:
    return LAYERS[name.split(".")[0]]


def test_every_module_has_a_layer():
    assert {n.split(".")[0] for n in GRAPH} <= set(LAYERS), "add new packages to LAYERS and docs/layout.md"


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_point_downwards(name):
    upward = sorted(m for m in GRAPH[name] if _layer(m) > _layer(name))
    assert not upward, f"{name} (layer {_layer(name)}) imports higher layers: {upward}"


def test_no_import_cycle():
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


def test_no_package_cycle():
    """Between packages too: models -> sampling -> models would be a circle even without a module cycle."""
    edges = {(a.split(".")[0], b.split(".")[0]) for a, deps in GRAPH.items() for b in deps}
    pairs = {(a, b) for a, b in edges if a != b and (b, a) in edges}
    assert not pairs, f"packages importing each other: {sorted(pairs)}"


@pytest.mark.parametrize("name", MATH)
def test_math_imports_only_math(name):
    assert GRAPH[name] <= set(MATH), f"{name} imports {sorted(GRAPH[name] - set(MATH))}"


def test_the_graph_is_not_empty():
    """The parser resolves relative imports (a broken resolver would pass every test above vacuously)."""
    assert "sampling.student" in GRAPH["sampling.latents"]
    assert "models.denoiser" in GRAPH["sampling.student"]
    assert "bundle" in GRAPH["training.recipes"]
    assert "parameterization" in GRAPH["sampling.lcm"]


# --- size: a module or function that outgrows these is doing more than one thing ------------------------
MAX_MODULE_LINES = 400
MAX_CLI_MODULE_LINES = 300   # the command line: thin shells over library calls
MAX_FUNCTION_LINES = 60


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_is_too_long(name):
    path = _modules()[name]
    limit = MAX_CLI_MODULE_LINES if name.split(".")[0] == "cli" else MAX_MODULE_LINES
    lines = len(path.read_text().splitlines())
    assert lines <= limit, f"{path.relative_to(PKG)} has {lines} lines (limit {limit}): split it by concern"


def _long_functions(source: str) -> list[tuple[str, int, int]]:
    """(name, def line, length) of every function in ``source`` longer than MAX_FUNCTION_LINES, counted from
    its ``def`` line to its last line (decorators, such as click options, not included)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append((node.name, node.lineno, length))
    return found


def test_no_function_is_too_long():
    long = [f"{path.relative_to(PKG)}:{line} {fn} ({n} lines)"
            for _, path in sorted(_modules().items()) for fn, line, n in _long_functions(path.read_text())]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_size_limits_can_fail():
    """The function check catches a 61-line function and passes a 60-line one."""
    assert _long_functions("def f():\n" + "    x = 1\n" * 60) == [("f", 1, 61)]
    assert _long_functions("def f():\n" + "    x = 1\n" * 59) == []
