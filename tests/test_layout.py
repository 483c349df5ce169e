"""The codebase's own rules: import direction between layers, lint and format."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_layers_flow_downwards_only():
    r = run(str(BIN / "lint-imports"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout


def test_ruff_lint_and_format_are_clean():
    lint = run(str(BIN / "ruff"), "check", ".")
    assert lint.returncode == 0, lint.stdout
    fmt = run(str(BIN / "ruff"), "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout


def test_importing_the_lower_layers_starts_nothing_and_loads_no_prefect():
    code = (
        "import sys, counting.kernel, counting.sparse, streaming.node.streamer, streaming.aggregator.aggregator; "
        "print('prefect' in sys.modules)"
    )
    r = run(sys.executable, "-c", code)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
