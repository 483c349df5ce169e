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
    assert "8 kept, 0 broken" in r.stdout


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


RUNTIME = ["numba", "scipy", "zmq", "paramiko", "sfapi_client", "httpx", "sqlalchemy", "prefect", "h5py"]


def test_loading_settings_loads_no_runtime():
    # Every process builds its settings first; the runtime loads only where a command needs it.
    code = (
        "import sys, flows.settings; s = flows.settings.load_settings(); "
        f"print(sorted(m for m in {RUNTIME!r} if m in sys.modules))"
    )
    r = run(sys.executable, "-c", code)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_the_cli_registers_its_commands_without_their_runtime():
    code = f"import sys, flows.cli; print(sorted(m for m in {RUNTIME!r} if m in sys.modules))"
    r = run(sys.executable, "-c", code)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_the_sfapi_machines_are_the_clients():
    from sfapi_client.compute import Machine

    from tasks.settings import SFAPI_MACHINES

    assert sorted(SFAPI_MACHINES) == sorted(m.value for m in Machine)


def test_every_public_face_resolves():
    # The role subpackages export their names lazily (PEP 562): each name must still exist where it points.
    import importlib

    faces = [p.parent for p in ROOT.glob("*/*/__init__.py") if p.parts[-3] in ("streaming", "tasks")]
    assert faces
    for face in faces:
        package = importlib.import_module(f"{face.parent.name}.{face.name}")
        for name in getattr(package, "__all__", []):
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
