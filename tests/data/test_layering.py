"""`data/` does not import `models/`: the chat template and image processor belong to the policy's
processor (models/processor.py), used by training and PolicyRunner alike."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import sensorvla

DATA = Path(sensorvla.__file__).parent / "data"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # every import, lazy ones inside functions too
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_data_module_imports_models():
    offenders = {
        str(p.relative_to(DATA)): sorted(m for m in imported_modules(p) if m.startswith("sensorvla.models"))
        for p in DATA.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_data_layer_loads_no_model_code():
    modules = sorted(
        "sensorvla.data." + ".".join(p.relative_to(DATA).with_suffix("").parts)
        for p in DATA.rglob("*.py")
        if p.name != "__init__.py"
    )
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules)
    code += "bad = sorted(m for m in sys.modules if m.startswith('sensorvla.models'))\nprint(bad)\nassert not bad\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
