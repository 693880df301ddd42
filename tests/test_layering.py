"""The module map of docs/design.md is the code's: every module has a row, every row a module, and each row's
imports are exactly what the module imports from ptqtp (function-level imports included). The import graph
has no cycle, nothing imports the CLI, kernel code imports nothing from ptqtp, and `import ptqtp` stays cheap
(no triton, no CUDA initialisation)."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "ptqtp"
DESIGN = ROOT / "docs" / "design.md"
NOT_MODULES = {"triton_kernels", "_C", "_C_cuda"}  # installed into ptqtp but not Python modules of this tree


def _module_of(path: pathlib.Path) -> str:
    """A module's row name; a subpackage (`backends/`) has one row, and imports inside it are its own business."""
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else path.stem


def _modules() -> set[str]:
    """Every module of the package, as the design table names it (a subpackage by its folder name)."""
    return {_module_of(p) for p in PKG.rglob("*.py")}


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The ptqtp modules `path` imports, at any depth of the file (top level, functions, methods)."""
    subpkg = path.relative_to(PKG).parts[0] if path.parent != PKG else None
    found = set()
    known = modules | NOT_MODULES
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against ptqtp/ or ptqtp/backends/
                parts = (node.module or "").split(".") if node.module else []
                if subpkg and node.level == 1:
                    found.add(subpkg)
                    continue
                if parts:
                    found.add(parts[0])
                else:
                    found.update(a.name if a.name in known else "__init__" for a in node.names)
            elif node.module and node.module.split(".")[0] == "ptqtp":
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(a.name if a.name in known else "__init__" for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "ptqtp":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found - NOT_MODULES


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in PKG.rglob("*.py"):
        me = _module_of(path)
        graph[me] |= _imports(path, modules) - {me}
    return graph


def _design_table() -> dict[str, set[str]]:
    """Rows of the module map in docs/design.md: module -> the ptqtp modules its row says it imports."""
    rows = {}
    text = DESIGN.read_text()
    start = text.index("| module |")  # the module map: from its header row to the first blank line
    for line in text[start:].split("\n\n", 1)[0].splitlines()[2:]:
        m = re.match(r"\|\s*`([\w./]+)`\s*\|.*\|\s*([^|]*)\|\s*$", line)
        assert m, f"docs/design.md: cannot read the module map row {line!r}"
        name = m.group(1).removesuffix(".py").rstrip("/")
        cell = m.group(2).strip()
        assert name not in rows, f"docs/design.md has two rows for {name}"
        rows[name] = set() if cell in ("-", "–", "") else {d.strip().strip("`") for d in cell.split(",")}
    assert rows, "no module map found in docs/design.md"
    return rows


def test_every_module_has_a_row_and_every_row_a_module():
    rows, modules = set(_design_table()), _modules()
    assert not modules - rows, f"add rows for {sorted(modules - rows)} to the module map in docs/design.md"
    assert not rows - modules, f"docs/design.md has rows for modules that do not exist: {sorted(rows - modules)}"


def test_each_row_lists_exactly_what_the_module_imports():
    table, graph = _design_table(), _graph()
    wrong = []
    for module in sorted(set(table) & set(graph)):
        extra, missing = graph[module] - table[module], table[module] - graph[module]
        if extra:
            wrong.append(f"{module} imports {sorted(extra)}, not in its row")
        if missing:
            wrong.append(f"{module}'s row lists {sorted(missing)}, which it does not import")
    assert not wrong, "docs/design.md and the code disagree:\n" + "\n".join(wrong)


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]):
        state[m] = 1
        for dep in sorted(graph.get(m, ())):
            if dep == "__init__":  # the package root imports on attribute access; nothing may import it (below)
                continue
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [m, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_nothing_imports_the_cli_or_the_package_root():
    graph = _graph()
    assert [m for m, deps in graph.items() if "cli" in deps] == ["__main__"]
    assert not [m for m, deps in graph.items() if "__init__" in deps], "import the defining module, not ptqtp"


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
