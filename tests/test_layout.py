"""The package's floor plan, read from its import statements: data flows one way.

- no two folders (or top-level modules) of the package import each other, directly or round a
  longer loop;
- `registry` (what methods register) sits below everything and imports nothing of the package;
- `hub` and `evaluation` import only `registry`; `core` only `hub` and `registry`: it knows no
  method (methods register themselves), nor `evaluation`, `search`, `demo` or `cli`;
- nothing inside the package imports `cli`, which sits on top of everything.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_deelbo"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every `hf_deelbo...` module a file imports, at module level or inside functions, with
    relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            # `from . import lock` imports the module hf_deelbo.<...>.lock
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "hf_deelbo" or name.startswith("hf_deelbo.")}


def _imports_by_module() -> dict[str, set[str]]:
    return {_module_name(path): imported_modules(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violations(allowed_layers: set[str], layers: set[str]) -> list[str]:
    problems = []
    for module, imports in _imports_by_module().items():
        if _layer(module) not in layers:
            continue
        for name in sorted(imports):
            # a package's own modules, and the modules of the allowed layers
            if _layer(name) not in allowed_layers | {_layer(module)} and _is_module(name):
                problems.append(f"{module} imports {name}")
    return problems


def _is_module(name: str) -> bool:
    """Whether `name` is a module or package of hf_deelbo (not a name imported from one)."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer_graph() -> dict[str, set[str]]:
    """Folder (or top-level module) → the other folders it imports; "" is the package's `__init__`."""
    graph: dict[str, set[str]] = {}
    for module, imports in _imports_by_module().items():
        targets = {_layer(name) for name in imports if _is_module(name)} - {_layer(module)}
        graph.setdefault(_layer(module), set()).update(targets)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every loop of the graph, each once, as the list of its nodes from its smallest."""
    found = []

    def walk(path):
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == path[0]:
                found.append(list(path))
            elif nxt not in path and nxt > path[0]:
                walk([*path, nxt])

    for start in sorted(graph):
        walk([start])
    return found


def test_no_two_folders_import_each_other():
    assert cycles(layer_graph()) == []


def test_cycle_finder_finds_direct_and_longer_loops():
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_registry_imports_nothing_of_the_package():
    assert _violations(set(), {"registry"}) == []


def test_core_imports_no_method():
    # core's trainer saves and pushes through the hub (which knows only the registry)
    assert _violations({"hub", "registry"}, {"core"}) == []


@pytest.mark.parametrize("layer", ["hub", "evaluation"])
def test_hub_and_evaluation_import_only_the_registry(layer):
    assert _violations({"registry"}, {layer}) == []


def test_nothing_imports_cli():
    importers = [
        module
        for module, imports in _imports_by_module().items()
        if _layer(module) != "cli" and any(_layer(name) == "cli" for name in imports)
    ]
    assert importers == []


def test_the_import_reader_sees_relative_and_deferred_imports(tmp_path):
    # what the checks above rely on, on the package's own files
    imports = _imports_by_module()
    assert "hf_deelbo.registry" in imports["hf_deelbo.methods.l2sp"]  # `from ..registry import`
    assert "hf_deelbo.core.lock" in imports["hf_deelbo.core.trainer"]  # `from . import lock`
    assert "hf_deelbo.methods.deelbo.trainer" in imports["hf_deelbo.cli.train"]  # inside a function


def test_the_posterior_s_earlier_name_warns_and_is_the_same_class():
    import hf_deelbo
    from hf_deelbo.methods.deelbo import posterior

    for module in (hf_deelbo, posterior):
        with pytest.warns(FutureWarning, match="GaussianPosterior"):
            assert module.IsotropicGaussianPosterior is hf_deelbo.GaussianPosterior
    with pytest.raises(AttributeError):
        getattr(hf_deelbo, "NoSuchName")  # noqa: B009 - the module's __getattr__ under test
