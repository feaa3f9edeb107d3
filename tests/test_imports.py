"""The package import graph is layered: no cycles, no upward import — function-level imports
included (they used to hide loops), ``if TYPE_CHECKING:`` blocks excluded. Loading a trained
run for inference imports neither Lightning nor the training package."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import anomorph

ROOT = Path(anomorph.__file__).parent

# lowest first; a component may import only components listed before it (or itself)
LAYERS = ["errors", "data", "config", "networks", "losses", "runs", "guidance", "uncertainty", "scoring",
          "reporting", "evaluation", "training", "benchmark", "cli"]


def _component(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "anomorph" or len(parts) < 2:
        return None
    return parts[1]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """Absolute anomorph module names imported anywhere in ``path`` (outside TYPE_CHECKING)."""
    relative = path.relative_to(ROOT.parent).with_suffix("")
    package = list(relative.parts[:-1]) if relative.name != "__init__" else list(relative.parts[:-1])
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x
                    found.update(f"{module}.{alias.name}" for alias in node.names)
                else:
                    found.add(module)
                    found.update(f"{module}.{alias.name}" for alias in node.names)
            elif node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def import_graph() -> dict[str, set[str]]:
    """component → components it imports (the root ``anomorph/__init__.py`` is the public
    facade and may import anything lazily; it is not a node)."""
    names = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.is_file() and p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    graph: dict[str, set[str]] = {name: set() for name in names}
    for path in ROOT.rglob("*.py"):
        if path == ROOT / "__init__.py":
            continue
        source = _component("anomorph." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        for module in _imports(path):
            target = _component(module)
            if target in names and source in names and target != source:
                graph[source].add(target)
    return graph


def test_import_walker_sees_function_level_and_relative_imports(tmp_path):
    sample = ROOT / "scoring" / "base.py"
    imports = _imports(sample)
    assert "anomorph.config" in imports  # module-level relative import
    assert "anomorph.runs" in imports  # function-level import inside ModelScorer.from_run


def test_package_graph_has_no_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if target not in state:
                dfs(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)


def test_no_upward_imports():
    graph = import_graph()
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{source} → {target}" for source, targets in graph.items() for target in targets
              if source in rank and target in rank and rank[target] > rank[source]]
    assert not upward, "upward imports (see LAYERS in tests/test_imports.py): " + ", ".join(sorted(upward))


def test_reporting_size_bins_match_metrics():
    from anomorph.evaluation.metrics import SIZE_BINS
    from anomorph.reporting.report import SIZE_BINS as REPORT_BINS

    assert tuple(REPORT_BINS) == tuple(SIZE_BINS)


def test_loading_a_run_for_inference_imports_no_training(tiny_calibrated_run):
    code = (
        "import sys\n"
        "from anomorph.scoring import Detector\n"
        f"d = Detector.from_run({str(tiny_calibrated_run)!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') "
        "or m.startswith('anomorph.training'))\n"
        "print('LOADED', d.name, bad)\n"
        "sys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LOADED" in result.stdout


def test_config_knows_every_network_name():
    from anomorph.config import MODEL_NAMES
    from anomorph.networks.factory import NETWORKS

    assert set(MODEL_NAMES) == set(NETWORKS)
