"""The package's shape: subpackages in layers, no import cycles, public names import."""

import ast
from pathlib import Path

import hf_blockprune

PACKAGE = Path(hf_blockprune.__file__).parent
# Each subpackage imports only from itself and those before it.
LAYERS = ["structure", "pruning", "compact", "training", "integrations", "tasks"]


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    """The hf_blockprune modules `path` imports, anywhere in the file (functions included), as `pkg.module`."""
    here = _module_name(path).split(".")[:-1]  # the module's package, relative to hf_blockprune
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("hf_blockprune."):
                target = node.module.split(".")[1:]
            else:
                continue
            found.add(".".join(target))
    return found


def _imported_names(path: Path) -> list[tuple[str, str]]:
    """`(module, name)` of every name `path` imports from another hf_blockprune module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("hf_blockprune")):
            found += [(node.module or ".", alias.name) for alias in node.names]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    return {name: {t for t in _imports(path) if t in modules} for name, path in modules.items()}


def test_the_modules_live_in_the_six_subpackages():
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()) == sorted(LAYERS)
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py"]


def test_there_is_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [node, target])}")
            if target not in state:
                visit(target, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_subpackages_import_only_from_earlier_layers():
    for module, targets in _graph().items():
        for target in targets:
            source_layer, target_layer = LAYERS.index(module.split(".")[0]), LAYERS.index(target.split(".")[0])
            assert target_layer <= source_layer, f"{module} imports {target}"


def test_the_saved_loader_imports_nothing_of_the_library():
    assert _imports(PACKAGE / "structure" / "modeling_blockprune.py") == set()


def test_public_names_import_from_the_package():
    for name in hf_blockprune.__all__:
        assert getattr(hf_blockprune, name) is not None


def test_no_private_name_is_imported_across_modules():
    sources = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "tests").glob("*.py")]
    private = [f"{path.name}: from {module} import {name}" for path in sources
               for module, name in _imported_names(path) if name.startswith("_") and not name.startswith("__")]
    assert not private, private


def _calls(path: Path) -> set[str]:
    """The names of the functions and methods `path` calls (`f(...)`, `obj.f(...)`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            found.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return found


# Finding the structure walks the module tree: only the discovery does it, once per model; compaction replaces the
# kept structure with the compacted one. Everyone else reads `structure_of(model)` (or binds it: `prunable_layers`).
DISCOVERY = {"find_structure": {"structure.discovery", "tests/test_structure.py"},
             "stack_specs": {"structure.discovery"}, "find_layer_lists": {"structure.discovery"},
             "keep_structure": {"structure.discovery", "compact.compaction"}}


def test_only_the_discovery_finds_the_structure():
    sources = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "tests").glob("*.py"),
               *(PACKAGE.parent / "benchmarks").glob("*.py"), *(PACKAGE.parent / "examples").glob("*.py")]
    offenders = []
    for path in sources:
        name = _module_name(path) if PACKAGE in path.parents else str(path.relative_to(PACKAGE.parent))
        for function in _calls(path) & set(DISCOVERY):
            if name not in DISCOVERY[function]:
                offenders.append(f"{name} calls {function}")
    assert not offenders, offenders


def test_the_structure_is_not_read_past_the_discovery():
    """Nobody but the structure package reads the kept structure's attribute or the raw layout's per-layer records."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name.startswith("structure."):
            continue
        text = path.read_text()
        if "STRUCTURE_ATTRIBUTE" in text or "blockprune_structure" in text:
            offenders.append(f"{name} reads the kept structure directly")
        readers = _calls(path) & {"record_slots", "attention_record", "layout_entry"}
        if readers:
            offenders.append(f"{name} reads the layout's records ({', '.join(sorted(readers))})")
    assert not offenders, offenders


# Each third-party library the core does not need lives in one file of `integrations/` (registered with the core).
INTEGRATIONS = {"peft": "integrations.peft", "sentence_transformers": "integrations.sentence_transformers"}


def test_each_integration_lives_in_one_file():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module or ""]
            for module in modules:
                library = module.split(".")[0]
                if library in INTEGRATIONS and name != INTEGRATIONS[library]:
                    offenders.append(f"{name} imports {module}")
    assert not offenders, offenders
    core = [p for p in PACKAGE.rglob("*.py") if _module_name(p).split(".")[0] not in ("integrations", "tasks")]
    assert not [p for p in core if any(t.startswith("integrations") for t in _imports(p))]
