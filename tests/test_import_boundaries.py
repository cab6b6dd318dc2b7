"""Layer rules: dependencies point down, modules import each other without cycles, and pure and
single-process modules never load distributed or service backends.

The layer table is CONTRIBUTING.md's. Imports are read from the source (every `import` and
`from ... import`, inside functions and `TYPE_CHECKING` blocks too), so a lazy import cannot
hide an upward dependency. The backend checks import each module in a fresh interpreter,
because a module imported earlier in the test process would hide what the one under test
pulls in.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "emmoe_dist"
HEAVY = ("deepspeed", "ray", "vllm", "openai", "wandb")

# Every top-level module and package of emmoe_dist, by layer. A new one must be placed here.
LAYERS: dict[str, int] = {
    # 0 pure Python: no torch
    "config": 0,
    "errors": 0,
    "families": 0,
    "catalog": 0,
    "experts": 0,
    "metrics": 0,
    "records": 0,
    "files": 0,
    "run_folder": 0,
    "trajectory": 0,
    "agreement": 0,
    # 1 one process, torch
    "models": 1,
    "data": 1,
    "adapters": 1,
    "routing": 1,
    "routing_plots": 1,
    "interp": 1,
    # 2 distributed
    "parallel": 2,
    # 3 workflows
    "train": 3,
    "generate": 3,
    "judge": 3,
    "sweep": 3,
    "tracking": 3,
    "report": 3,
    "ray_local": 3,
    "profiling": 3,
    "serve": 3,
    "analyze": 3,
    "cli": 3,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    """The package face (`emmoe_dist/__init__.py`, its version) counts as layer 0."""
    parts = module.split(".")
    return 0 if len(parts) == 1 else LAYERS[parts[1]]


def _imports(module: str) -> Iterator[tuple[str, int]]:
    """(imported emmoe_dist module, line) for every import in `module`'s source."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the submodule `pkg.mod`
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES and target.startswith("emmoe_dist"):
                target = target.rpartition(".")[0]  # `import emmoe_dist.x.y` names x.y's module
            if target in MODULES and target != module:
                yield target, node.lineno


def test_every_module_has_a_layer() -> None:
    tops = {m.split(".")[1] for m in MODULES if "." in m}
    assert sorted(tops - LAYERS.keys()) == [], "place new modules in LAYERS (CONTRIBUTING.md)"


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{MODULES[m].relative_to(REPO)}:{line}: layer {_layer(m)} imports {target} "
        f"(layer {_layer(target)})"
        for m in MODULES
        for target, line in _imports(m)
        if _layer(target) > _layer(m)
    ]
    assert upward == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = {m: {target for target, _ in _imports(m)} for m in MODULES}
    assert _cycles(graph) == []


def test_the_checks_see_cycles_and_upward_imports() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    lazy = dict(_imports("emmoe_dist.sweep.trial"))  # imports inside functions count too
    assert "emmoe_dist.sweep.wandb_views" in lazy and "emmoe_dist.judge.runner" in lazy
    assert _layer("emmoe_dist.analyze.steer") == 3 and _layer("emmoe_dist.files") == 0


def _light_modules() -> list[tuple[str, bool]]:
    """Layer-0 and layer-1 modules, and whether they are pure (layer 0: no torch either)."""
    return [(m, _layer(m) == 0) for m in MODULES if "." in m and _layer(m) <= 1]


_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
roots = {m.split('.')[0] for m in sys.modules}
print(json.dumps(sorted(roots)))
"""


@pytest.mark.parametrize(("module", "pure"), _light_modules(), ids=lambda v: str(v))
def test_module_imports_no_heavy_backend(module: str, pure: bool) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert not loaded & set(HEAVY), f"{module} loads {sorted(loaded & set(HEAVY))}"
    if pure:
        assert "torch" not in loaded, f"layer-0 module {module} loads torch"


def test_package_import_is_light() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "emmoe_dist.cli.main"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert "torch" not in loaded, "`emmoe --help` must not import torch"
