"""Imports inside ptqtp follow docs/design.md: data flows one way, kernels import nothing from ptqtp,
`import ptqtp` stays cheap (no triton, no CUDA initialisation)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "ptqtp"

# module -> ptqtp modules it may import (docs/design.md); "backends" covers the subpackage.
ALLOWED = {
    "errors": set(),
    "_version": set(),
    "format": {"errors"},
    "config": {"errors", "format", "_version"},
    "solver": {"errors"},
    "baselines": {"errors", "solver"},
    "packing": {"errors", "format", "solver"},
    "checkpoint": {"errors", "format", "config", "_version"},
    "loader": {"errors", "format", "config", "checkpoint"},
    "pipeline": {"errors", "format", "config", "loader", "solver", "baselines", "packing", "checkpoint",
                 "calibration", "_version"},
    "calibration": {"errors", "format", "config", "solver", "packing", "replace", "checkpoint", "loader",
                    "pipeline", "baselines", "calibration_data", "_version"},
    "calibration_data": {"errors"},
    "layouts": {"errors", "format", "packing"},
    "backends": {"errors", "format", "packing", "layouts", "backends"},
    "ops": {"errors", "format", "packing", "backends", "layouts"},
    "modules": {"errors", "format", "packing", "ops", "layouts", "backends"},
    "replace": {"errors", "format", "config", "modules", "solver", "packing", "baselines"},
    "hf": {"errors", "format", "config", "replace", "modules", "checkpoint", "_version"},
    "generation": {"errors", "hf"},
    "evaluate": {"errors", "format", "config", "hf", "checkpoint", "_version"},
    "inspect": {"errors", "format", "config", "checkpoint", "backends", "packing", "_version", "hf"},
    "cli": {"errors", "_version", "pipeline", "evaluate", "generation", "inspect"},
    "__init__": {"errors", "config", "_version", "hf"},
    "__main__": {"cli"},
    # serving-engine plugins (vllm.py imports vllm); nothing in ptqtp imports them
    "integrations": {"errors", "format", "config", "packing", "ops", "integrations"},
}
SUBPACKAGES = ("backends", "integrations")  # checked as one unit each


def _ptqtp_imports(path: pathlib.Path) -> set[str]:
    """First component below ptqtp of every ptqtp import in `path` (relative or absolute)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_subpkg = path.parent != PKG
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = (node.module or "").split(".")[0]
                if in_subpkg and node.level == 1:
                    found.add(path.parent.name)
                elif base:
                    found.add(base)
                else:
                    found.update(a.name.split(".")[0] for a in node.names)
            elif node.module and node.module.split(".")[0] == "ptqtp":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "ptqtp" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            pass  # lazy public-API imports in __init__ are covered by _LAZY
    return found - {"triton_kernels", "_C", "_C_cuda"}


def test_every_module_is_in_the_layering_table():
    names = {p.stem for p in PKG.glob("*.py")}
    unknown = names - set(ALLOWED) - {"experimental"}
    assert not unknown, f"add {sorted(unknown)} to docs/design.md and ALLOWED in this test"


def test_imports_follow_the_layering_table():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "experimental":
            continue
        key = rel.parts[0] if rel.parts[0] in SUBPACKAGES else path.stem
        for dep in _ptqtp_imports(path) - ALLOWED.get(key, set()) - {key}:
            bad.append(f"{rel} imports ptqtp.{dep}")
    assert not bad, "imports outside docs/design.md:\n" + "\n".join(bad)


def test_kernel_code_imports_nothing_from_ptqtp():
    for path in (ROOT / "triton_kernels").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            mods += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(m.split(".")[0] == "ptqtp" for m in mods), f"{path} imports ptqtp"


def test_import_is_cheap_and_cuda_free():
    code = (
        "import sys, ptqtp\n"
        "assert 'triton' not in sys.modules, 'import ptqtp imported triton'\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized(), 'import ptqtp initialised CUDA'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
