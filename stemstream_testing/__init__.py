"""Test support: fakes, oracles and reference implementations used by the tests, the benchmarks and the demo's tests.

Never imported by the product (counting, streaming, tasks, flows; an import-linter contract in pyproject.toml
enforces it) and not installed: it is not in ``[tool.setuptools] packages``. It is importable from the repository
root (pytest runs there; the benchmarks that need it put the root on ``sys.path``).
"""
