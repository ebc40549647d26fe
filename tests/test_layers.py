"""The package's layering: the import-linter contracts hold, no module imports itself through
a cycle, and the model core runs without Ray."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_import_contracts_are_kept():
    """`lint-imports` (the contracts in pyproject.toml) passes; CI runs it too."""
    run = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "0 broken" in run.stdout


def test_no_import_cycles_between_modules():
    """No strongly connected set of modules, counting imports inside functions."""
    import grimp

    graph = grimp.build_graph("raykit", include_external_packages=False)
    modules = sorted(graph.modules)
    edges = {
        m: {
            d
            for d in graph.find_modules_directly_imported_by(m)
            if not m.startswith(d + ".") and d != "raykit"
        }
        for m in modules
    }
    cycles = [
        (m, d)
        for m in modules
        for d in edges[m]
        if graph.chain_exists(importer=d, imported=m, as_packages=False)
    ]
    assert cycles == []


def test_reranker_scores_without_loading_ray(tiny_model_dir):
    """`from raykit import Reranker` and scoring a pair load no `ray` module."""
    code = (
        "import sys\n"
        "from raykit import Reranker\n"
        f"score = Reranker({tiny_model_dir!r}).compute_score(['a query', 'a passage'])\n"
        "assert isinstance(score, float), score\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
