"""The package's layers, checked on its import graph and its source: the library never imports the
workflows, layers never import the engine, no import circles, few floors, short functions."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tracin"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool):
    """Modules of the package that ``path`` imports (``from . import x`` counts x when it is a module)."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            if not target.startswith("tracin"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if (SRC.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                          or (SRC.parent / Path(*sub.split("."))).is_dir() else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tracin"))
    return found


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def graph(top_level_only: bool):
    return {m: {i for i in imports(p, top_level_only) if i in MODULES and i != m} for m, p in MODULES.items()}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_library_never_imports_the_workflows():
    # tracin.__main__ is `python -m tracin` (and `torchrun -m tracin`): the command line's own entry point
    wrong = [(m, i) for m, deps in graph(False).items() if not in_package(m, "tracin.workflows") and m != "tracin.__main__"
             for i in deps if in_package(i, "tracin.workflows")]
    assert not wrong, f"library modules importing the workflows: {wrong}"


def test_layers_never_import_the_engine_and_the_engine_never_imports_the_facade():
    edges = graph(False)
    wrong = [(m, i) for m, deps in edges.items() if in_package(m, "tracin.layers") for i in deps if in_package(i, "tracin.engine")]
    wrong += [(m, i) for m, deps in edges.items() if in_package(m, "tracin.engine") or in_package(m, "tracin.layers")
              for i in deps if i == "tracin.api"]
    assert not wrong, wrong


def floors(edges):
    """Longest import chain from each module (1 = imports nothing of the package); raises on a circle."""
    depth, visiting = {}, set()

    def visit(m):
        if m in depth:
            return depth[m]
        if m in visiting:
            raise AssertionError(f"import circle through {m}")
        visiting.add(m)
        depth[m] = 1 + max((visit(d) for d in edges[m]), default=0)
        visiting.discard(m)
        return depth[m]

    for m in edges:
        visit(m)
    return depth


def test_no_import_circles_and_at_most_eight_floors():
    depth = floors(graph(True))
    assert max(depth.values()) <= 8, sorted(depth.items(), key=lambda kv: -kv[1])[:5]


def test_no_import_circles_through_imports_inside_functions():
    floors(graph(False))  # raises on a circle, lazy imports included


def private_accesses(source: str):
    """``obj._name`` on anything but ``self`` / ``cls`` (dunder names aside): another object's private state."""
    return [f"{node.lineno}: {ast.unparse(node)}" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]


def test_no_module_reads_another_objects_private_attributes():
    found = {name: hits for name, path in MODULES.items() if (hits := private_accesses(path.read_text()))}
    assert not found, found


def test_the_private_access_check_can_fail():
    assert private_accesses("run._load(0)\nself._ok = 1\nx.__class__") == ["1: run._load"]


def test_a_circle_is_found():  # the checker itself can fail
    with pytest.raises(AssertionError, match="import circle"):
        floors({"a": {"b"}, "b": {"a"}})


def test_the_package_root_holds_at_most_ten_modules():
    root = sorted(p.name for p in SRC.glob("*.py"))
    assert len(root) <= 10, root


def test_functions_are_short_and_take_few_parameters():
    long, wide = [], []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > 80:
                    long.append(f"{name}.{node.name}")
                a = node.args
                count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - (a.args[:1] != [] and a.args[0].arg in ("self", "cls"))
                if count > 8 and not (name == "tracin.api" and node.name == "__init__"):  # the TracIn keyword front
                    wide.append(f"{name}.{node.name} ({count})")
    assert not long, f"functions over 80 lines: {long}"
    assert not wide, f"parameter lists over 8: {wide}"


SCRIPTS = sorted(p for folder in ("benchmarks", "examples") for p in (SRC.parents[1] / folder).glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_benchmarks_and_examples_import_names_the_package_has(script):
    """Scripts outside the tests are not run by them; a name moved in the package must not leave them broken."""
    import importlib
    import importlib.util

    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tracin":
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names
                       if not hasattr(module, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
            assert not missing, f"{script.name} imports {missing} from {node.module}, which has no such name"
