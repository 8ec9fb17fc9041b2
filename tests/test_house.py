"""The house rules the code keeps: layers (import-linter), no import cycle, short functions,
few positional arguments in the training loop, cross-validation and lesion matching, the
torch-free commands starting without torch, and tests that mirror the package."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "segmenter"
TESTS = ROOT / "tests"
#: Functions exempt from the length rule (an argparse builder is one long declaration).
LONG_OK = {("cli.py", "build_parser")}
MAX_LINES = 60
#: Modules whose calls pass at most four positional arguments (logging calls excepted).
FEW_POSITIONAL = ("training/loop.py", "training/state.py", "workflows/crossval.py",
                  "evaluation/lesions.py")  # fmt: skip


def _functions(path: Path) -> list[tuple[str, int]]:
    """(name, lines of code without the docstring, blank and comment lines) per function."""
    source = path.read_text().splitlines()
    out = []
    for node in ast.walk(ast.parse("\n".join(source))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        first = node.body[0]
        has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
        start = first.end_lineno + 1 if has_doc else first.lineno
        lines = [s for s in source[start - 1 : node.end_lineno] if s.strip()]
        out.append((node.name, sum(not s.strip().startswith("#") for s in lines)))
    return out


def test_the_layer_contracts_hold() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    run = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "2 kept, 0 broken" in run.stdout


def test_no_module_imports_itself_through_others() -> None:
    graph = grimp.build_graph("segmenter")
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:  # Tarjan's strongly connected components
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in edges[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    assert cycles == []


def test_functions_stay_short() -> None:
    long = [
        f"{path.relative_to(PACKAGE)}:{name} ({n} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, n in _functions(path)
        if n > MAX_LINES and (path.name, name) not in LONG_OK
    ]
    assert long == []


@pytest.mark.parametrize("module", FEW_POSITIONAL)
def test_calls_pass_at_most_four_positional_arguments(module: str) -> None:
    tree = ast.parse((PACKAGE / module).read_text())
    many = [
        f"{module}:{node.lineno} {ast.unparse(node.func)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and len(node.args) > 4
        and not ast.unparse(node.func).startswith(("log.", "logger."))
    ]
    assert many == []


@pytest.mark.parametrize(
    "module",
    ["segmenter.data.verify", "segmenter.planning.planner", "segmenter.planning.fingerprint",
     "segmenter.evaluation.evaluate", "segmenter.preprocessing.pipeline"],
)  # fmt: skip
def test_torch_free_commands_start_without_torch(module: str) -> None:
    code = f"import sys, {module}, segmenter.cli; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


def test_tests_mirror_the_package() -> None:
    # tests/<subpackage>/test_<module>.py tests segmenter/<subpackage>/<module>.py
    stray = [
        str(path.relative_to(TESTS))
        for path in sorted(TESTS.glob("*/test_*.py"))
        if not (PACKAGE / path.parent.name / f"{path.stem.removeprefix('test_')}.py").is_file()
    ]
    assert stray == []
    # pytest's default import mode needs unique basenames and no __init__.py in the tests
    names = [path.name for path in TESTS.rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
    assert list(TESTS.rglob("__init__.py")) == []
