"""The structure of docs/architecture.md, enforced: allowed imports between layers, no import cycles, the
embedded world kept off the real path, and function lengths (p95 <= 50 lines, none over 80) in src/.

Every import counts, lazy ones inside functions too: an arrow is an arrow whenever it runs.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

import sensorvla

SRC = Path(sensorvla.__file__).parent

# Layer of each top-level part of the package (a sub-package or a root module), lowest first. Keep in step with
# docs/architecture.md, "Layers".
LAYERS = {
    "ground": {"__init__", "config", "streams", "presets", "io", "integrity", "runtime", "hub", "progress"},
    "serving": {"serving"},
    "data": {"data"},
    "models": {"models"},
    "training": {"training"},
    "inference": {"inference"},
    "eval": {"eval"},
    "plan": {"plan"},
    "world": {"world"},
    "entry": {"cli", "demo", "train", "train_diffusion"},
}
# What each layer may import besides itself. The real path (everything but world and entry) never imports world.
ALLOWED = {
    "ground": set(),
    "serving": {"ground"},
    "data": {"ground"},
    "models": {"ground", "data"},
    "training": {"ground", "data", "models"},
    "inference": {"ground", "data", "models", "serving"},
    "eval": {"ground", "data", "models", "training", "inference"},
    "plan": {"ground", "data", "models", "training"},
    "world": {"ground", "serving", "data", "models", "training", "inference", "eval", "plan"},
    "entry": set(LAYERS) - {"entry"},
}
MAX_FUNCTION_LINES = 80
P95_FUNCTION_LINES = 50


def module_name(path: Path, root: Path, package: str) -> str:
    """`root/data/dataset.py` -> `package.data.dataset`; a package's `__init__.py` is the package itself."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join((package, *parts)).removesuffix(".__init__")


def imports_of(path: Path, package: str) -> set[str]:
    """Every `package...` module name that `path` imports (module level and inside functions alike)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{a.name}" for a in node.names}  # resolved to the module by import_graph
    return {n for n in names if n == package or n.startswith(package + ".")}


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`from a import b` counts as `a.b` when that is a module)."""
    modules = {module_name(p, root, package): p for p in root.rglob("*.py")}
    graph = {}
    for mod, path in modules.items():
        targets = set()
        for name in imports_of(path, package):
            while name not in modules and "." in name:  # `from pkg.mod import func` -> pkg.mod
                name = name.rpartition(".")[0]
            if name in modules and name != mod and not mod.startswith(name + "."):  # a parent package: no arrow
                targets.add(name)
        graph[mod] = targets
    return graph


def layer_of(module: str, package: str, layers: dict[str, set[str]]) -> str:
    """The layer that a module's top-level part belongs to; KeyError naming the table to extend."""
    part = module.split(".")[1] if "." in module else "__init__"
    for layer, parts in layers.items():
        if part in parts:
            return layer
    raise KeyError(f"{package}.{part} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def upward_imports(graph: dict[str, set[str]], package: str, layers=LAYERS, allowed=ALLOWED) -> list[str]:
    """`a -> b (layer x -> layer y)` for every import that the layer table does not allow."""
    out = []
    for mod, targets in sorted(graph.items()):
        src = layer_of(mod, package, layers)
        for t in sorted(targets):
            dst = layer_of(t, package, layers)
            if dst != src and dst not in allowed[src]:
                out.append(f"{mod} -> {t} ({src} -> {dst})")
    return out


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def function_lengths(root: Path) -> list[tuple[int, str]]:
    """(lines, `file:line name`) for every function and method below `root`, longest first."""
    rows = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def p95(values: list[int]) -> int:
    """The nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


# --- the package -------------------------------------------------------------------------------------------
def test_no_upward_imports_between_layers():
    assert upward_imports(import_graph(SRC, "sensorvla"), "sensorvla") == []


def test_no_import_cycles():
    assert import_cycles(import_graph(SRC, "sensorvla")) == []


def test_the_real_path_never_imports_the_embedded_world():
    graph = import_graph(SRC, "sensorvla")
    real = {m for m in graph if layer_of(m, "sensorvla", LAYERS) not in ("world", "entry")}
    assert {m: sorted(t for t in graph[m] if t.startswith("sensorvla.world")) for m in real} == {m: [] for m in real}
    assert {"sensorvla.world.tiny_qwen", "sensorvla.world.synth", "sensorvla.world.envs"} <= set(graph)


def test_every_part_of_the_package_has_a_layer_and_a_line_in_the_docs():
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    parts = {
        p.stem if p.is_file() else p.name for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    for part in sorted(parts - {"__init__"}):
        layer_of(f"sensorvla.{part}", "sensorvla", LAYERS)
        assert f"`{part}" in doc, f"docs/architecture.md does not describe {part}"


def test_function_lengths():
    rows = function_lengths(SRC)
    too_long = [f"{n} lines: {where}" for n, where in rows if n > MAX_FUNCTION_LINES]
    assert too_long == [], "split these functions into named steps:\n" + "\n".join(too_long)
    assert p95([n for n, _ in rows]) <= P95_FUNCTION_LINES, rows[: len(rows) // 20]


# --- the checker itself, on a synthetic package --------------------------------------------------------------
def write_package(root: Path, files: dict[str, str]) -> Path:
    """Write `{relative path: source}` under root/pkg (with the __init__.py files) and return root/pkg."""
    pkg = root / "pkg"
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in [path.parent, *path.parent.parents]:
            if parent == root:
                break
            (parent / "__init__.py").touch()
        path.write_text(text)
    return pkg


SYNTH_LAYERS = {"ground": {"__init__", "config"}, "data": {"data"}, "models": {"models"}}
SYNTH_ALLOWED = {"ground": set(), "data": {"ground"}, "models": {"ground", "data"}}


def test_checker_flags_an_upward_import_even_a_lazy_one(tmp_path):
    pkg = write_package(
        tmp_path,
        {
            "config.py": "X = 1\n",
            "data/dataset.py": "from pkg.config import X\n\ndef f():\n    from pkg.models.policy import build\n",
            "models/policy.py": "from pkg.data import dataset\n\ndef build():\n    pass\n",
        },
    )
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.data.dataset"] == {"pkg.config", "pkg.models.policy"}
    assert graph["pkg.models.policy"] == {"pkg.data.dataset"}  # `from pkg.data import dataset` is the module
    got = upward_imports(graph, "pkg", SYNTH_LAYERS, SYNTH_ALLOWED)
    assert got == ["pkg.data.dataset -> pkg.models.policy (data -> models)"]
    assert import_cycles(graph) == [["pkg.data.dataset", "pkg.models.policy"]]


def test_checker_passes_a_clean_package_and_names_an_unknown_part(tmp_path):
    pkg = write_package(
        tmp_path,
        {
            "config.py": "X = 1\n",
            "data/dataset.py": "import pkg.config\n",
            "models/policy.py": "from pkg.data.dataset import thing\nfrom pkg.models import heads\n",
            "models/heads.py": "import os\n",
        },
    )
    graph = import_graph(pkg, "pkg")
    assert upward_imports(graph, "pkg", SYNTH_LAYERS, SYNTH_ALLOWED) == []
    assert import_cycles(graph) == []
    (pkg / "extra.py").write_text("import pkg.models.policy\n")
    with pytest.raises(KeyError, match="pkg.extra is in no layer"):
        upward_imports(import_graph(pkg, "pkg"), "pkg", SYNTH_LAYERS, SYNTH_ALLOWED)


def test_function_length_measure(tmp_path):
    (tmp_path / "m.py").write_text(
        "def short():\n    return 1\n\n\nclass C:\n    def long(self):\n" + "        x = 1\n" * 9
    )
    assert function_lengths(tmp_path) == [(10, "m.py:6 long"), (2, "m.py:1 short")]
    assert p95(list(range(1, 101))) == 95 and p95([3]) == 3
