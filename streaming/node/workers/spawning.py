"""Starting worker processes with spawn without what they do not use."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def main_not_imported() -> Iterator[None]:
    """While a worker is spawned: spawn would import this process's __main__ in it first (the CLI: typer,
    rich, every command's settings; 0.2-0.4 s of each worker's start), which a worker never uses (its code
    and arguments come from streaming.node.workers.pool). Hidden from spawn's preparation, then put back."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if main is not None and k in main.__dict__}
    if main is not None:
        main.__spec__ = None
        main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)
