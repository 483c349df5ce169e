"""`stemstream keys`: make and show the CurveZMQ key pairs of the aggregator -> node hop.

`keys generate --out DIR` writes two key pairs in ZeroMQ's certificate format (``zmq.auth``), the format the
``streaming.curve`` settings read: the aggregator's (``aggregator.key``, ``aggregator.key_secret``) and the
nodes' shared one (``nodes.key``, ``nodes.key_secret``). The directory is made 0700, every file 0600; a file
that exists is never replaced (nothing is written then). `keys show DIR` prints public keys only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from counting.storage.durable import FinalName
from flows.cli.common import console, user_errors

__all__ = ["KEY_FILES", "keys_app", "register"]

SERVER, CLIENT = "aggregator", "nodes"


@dataclass(frozen=True)
class KeyFile:
    """One file `keys generate` writes, where it goes and the setting that takes it."""

    name: str
    setting: str
    where: str


KEY_FILES = (
    KeyFile(f"{SERVER}.key_secret", "streaming.curve.server_secret_file", "on the aggregator host only"),
    KeyFile(f"{SERVER}.key", "streaming.curve.server_public_file", "on every node and the flow host"),
    KeyFile(f"{CLIENT}.key_secret", "streaming.curve.client_secret_file", "on every node and the flow host"),
    KeyFile(f"{CLIENT}.key", "streaming.curve.allowed_clients", "on the aggregator host; a list: add more"),
)

keys_app = typer.Typer(
    help="CurveZMQ keys for the aggregator -> node hop: generate the two key pairs, show public keys.",
    no_args_is_help=True,
)


@keys_app.command("generate")
@user_errors
def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for the key files (made 0700)")],
) -> None:
    """Write the aggregator's and the nodes' key pairs (files 0600); never replaces a file."""
    taken = [k.name for k in KEY_FILES if (out / k.name).exists()]
    if taken:
        raise FileExistsError(f"{out} already holds {', '.join(taken)}: keys are never overwritten")
    if not out.exists():
        out.mkdir(parents=True)
        os.chmod(out, 0o700)  # mkdir's mode is cut by the umask; say it outright
    _write_pairs(out)
    for k in KEY_FILES:
        console.print(
            f"{out / k.name}  ->  {k.setting}  ({k.where})", markup=False, highlight=False, soft_wrap=True
        )


def _write_pairs(out: Path) -> None:
    """Make both pairs in a private scratch directory in ``out``, then give each file its name without
    replacing anything (a hard link, else a no-replace rename); on a clash the files named here are removed."""
    import zmq.auth

    scratch = Path(tempfile.mkdtemp(prefix=".keys-", dir=out))  # 0700 from mkdtemp
    named: list[Path] = []
    try:
        for pair in (SERVER, CLIENT):
            for made in zmq.auth.create_certificates(scratch, pair):
                os.chmod(made, 0o600)  # the public file too: this directory is private, copies are chosen
        for k in KEY_FILES:
            FinalName().publish(scratch / k.name, out / k.name)
            named.append(out / k.name)
    except BaseException:
        for path in named:
            path.unlink(missing_ok=True)  # ours, made a moment ago
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@keys_app.command("show")
@user_errors
def show(
    directory: Annotated[Path, typer.Argument(help="a directory of key files (.key, .key_secret)")],
) -> None:
    """Print the public key of every key file in the directory; secret keys are never printed."""
    from streaming.transport.security import load_keypair

    files = sorted(p for p in directory.iterdir() if p.suffix in (".key", ".key_secret"))
    if not files:
        raise FileNotFoundError(f"no .key or .key_secret files in {directory}")
    for path in files:
        public, secret = load_keypair(path)
        kind = "key pair, public" if secret is not None else "public"
        # z85 keys hold "[" and "]": printed as they are, never read as rich markup
        console.print(f"{path.name}: {kind} {public}", markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `keys generate` and `keys show` to the CLI."""
    app.add_typer(keys_app, name="keys")
