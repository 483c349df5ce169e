"""Slurm batch script for the node streamers: rendering (pure, no I/O besides the template).

The script asks for ``nodes`` whole nodes on the realtime QOS and starts one node streamer per node with
``srun``. Every value comes from :class:`SlurmSettings` and is shell-quoted; a golden-file test pins the
rendered text. Slurm stores batch scripts (``sacct``, admins), so :func:`render_batch_script` refuses
environment variables that look like secrets: the nodes read keys from files instead.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Mapping
from importlib import resources
from string import Template

from counting.errors import PermanentError
from tasks.settings import UNSAFE_PATH, WALLTIME, SlurmSettings

TEMPLATE = "node_streamers.sh.tmpl"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|PASSPHRASE|PRIVATE|CREDENTIAL", re.IGNORECASE)


class SlurmConfigError(PermanentError, ValueError):
    """The Slurm settings or the script inputs cannot make a valid batch script."""


def walltime_seconds(walltime: str) -> int:
    """A validated [D-]HH:MM:SS walltime in seconds."""
    days, hours, minutes, seconds = (int(g or 0) for g in WALLTIME.match(walltime).groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def render_batch_script(
    slurm: SlurmSettings, node_command: list[str] | str, env: Mapping[str, str] | None = None
) -> str:
    """Render the node-streamer batch script: #SBATCH header, exports, one srun task per node."""
    if not slurm.account:
        raise SlurmConfigError(
            "slurm.account is not set: give the NERSC project that holds the realtime grant (e.g. m1234)"
        )
    values = {
        "qos": shlex.quote(slurm.qos),
        "account": shlex.quote(slurm.account),
        "constraint": shlex.quote(slurm.constraint),
        "nodes": str(slurm.nodes),
        "walltime": shlex.quote(slurm.walltime),
        "job_name": shlex.quote(slurm.job_name),
        "output": shlex.quote(posixpath.join(slurm.log_dir, "%x_%j.out")),
        "optional_sbatch": _optional_sbatch(slurm),
        "exports": _exports(env or {}),
        "srun_options": "".join(
            " " + " ".join(shlex.quote(t) for t in shlex.split(o)) for o in slurm.srun_options
        ),
        "command": _command(node_command),
    }
    text = Template(_template()).substitute(values)
    # An empty block leaves an empty placeholder line; drop exactly those, keep the template's own layout.
    return "\n".join(line for line in text.split("\n") if line != _EMPTY)


_EMPTY = "\x00"  # stands for an empty optional block until its line is removed


def _template() -> str:
    """The batch script template shipped in tasks/nersc/templates."""
    return resources.files("tasks.nersc").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")


def _optional_sbatch(slurm: SlurmSettings) -> str:
    """#SBATCH lines for the reservation and the extra options (an empty-block marker when none)."""
    lines = []
    if slurm.reservation:
        lines.append(f"#SBATCH --reservation={shlex.quote(slurm.reservation)}")
    lines += [f"#SBATCH {line}" for line in slurm.extra_sbatch]
    return "\n".join(lines) or _EMPTY


def _is_key_file_path(name: str, value: str) -> bool:
    """NAME_FILE=/abs/path names where a secret lives (a 0600 file on the nodes), which is no secret."""
    return name.endswith("_FILE") and value.startswith("/") and not UNSAFE_PATH.search(value)


def _exports(env: Mapping[str, str]) -> str:
    """`export NAME=value` lines, sorted and quoted; refuses anything that looks like a secret."""
    lines = []
    for name in sorted(env):
        value = env[name]
        if not _ENV_NAME.match(name):
            raise SlurmConfigError(f"environment variable name {name!r} is not a valid shell name")
        if not isinstance(value, str):
            raise SlurmConfigError(f"environment variable {name} must be a str, not {type(value).__name__}")
        if (_SECRET_NAME.search(name) and not _is_key_file_path(name, value)) or "-----BEGIN" in value:
            raise SlurmConfigError(
                f"refusing to put {name} into the batch script: it looks like a secret and Slurm keeps "
                "batch scripts; pass the path of a 0600 key file on the nodes instead"
            )
        if "\n" in value or "\x00" in value:
            raise SlurmConfigError(f"environment variable {name} must be a single line")
        lines.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(lines) or _EMPTY


def _command(node_command: list[str] | str) -> str:
    """The node command: a list is quoted word by word; a str is taken as a ready shell command line."""
    text = node_command.strip() if isinstance(node_command, str) else shlex.join(node_command)
    if not text or "\n" in text or "\r" in text:
        raise SlurmConfigError("node_command must be a non-empty single-line command")
    return text
