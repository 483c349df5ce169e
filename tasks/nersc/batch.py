"""Slurm batch script for the node streamers: settings and rendering (pure, no I/O besides the template).

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

from pydantic import BaseModel, Field, field_validator

from counting.errors import PermanentError

TEMPLATE = "node_streamers.sh.tmpl"

# Options the template sets itself; an extra line repeating one would silently override a setting.
_MANAGED_SBATCH = {
    "-q": "qos",
    "--qos": "qos",
    "-A": "account",
    "--account": "account",
    "-C": "constraint",
    "--constraint": "constraint",
    "-N": "nodes",
    "--nodes": "nodes",
    "-t": "walltime",
    "--time": "walltime",
    "-J": "job_name",
    "--job-name": "job_name",
    "-o": "log_dir",
    "--output": "log_dir",
    "--reservation": "reservation",
    "--exclusive": "(always set)",
    "--no-requeue": "(always set)",
    "--requeue": "(never: a requeued job would start the streamers again with no session)",
}
_MANAGED_SRUN = {"-N", "--nodes", "-n", "--ntasks", "--ntasks-per-node", "-K", "--kill-on-bad-exit"}

_WORD = re.compile(r"^[A-Za-z0-9_.-]+$")
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.&|,*\[\]()-]+$")
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d{1,2}):(\d{2}):(\d{2})$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|PASSPHRASE|PRIVATE|CREDENTIAL", re.IGNORECASE)
_UNSAFE_PATH = re.compile(r"[\s'\"$`\\~#;&|<>*?]")


class SlurmConfigError(PermanentError, ValueError):
    """The Slurm settings or the script inputs cannot make a valid batch script."""


class SlurmSettings(BaseModel):
    """What the node-streamer allocation asks Slurm for (Perlmutter realtime QOS by default)."""

    account: str = Field("", description="NERSC project that holds the realtime grant, e.g. m1234")
    qos: str = "realtime"
    constraint: str = Field("cpu", description="Perlmutter node type: cpu or gpu")
    nodes: int = Field(4, ge=1, le=4096, description="nodes to allocate; one node streamer per node")
    walltime: str = Field("00:30:00", description="[D-]HH:MM:SS")
    job_name: str = "stemstream-nodes"
    reservation: str | None = None
    log_dir: str = Field(
        ".",
        description="directory on Perlmutter for the job's output (%x_%j.out); must exist, no $VARS or ~",
    )
    extra_sbatch: list[str] = Field(
        default_factory=list, description='more #SBATCH options, e.g. "--mail-type=END"'
    )
    srun_options: list[str] = Field(default_factory=list, description='more srun options, e.g. "-c 256"')

    @field_validator("account")
    @classmethod
    def _account(cls, v: str) -> str:
        if v and not _WORD.match(v):
            raise ValueError(f"account {v!r} may hold only letters, digits, '_', '.', '-' (e.g. m1234)")
        return v

    @field_validator("qos", "job_name")
    @classmethod
    def _word(cls, v: str) -> str:
        if not _WORD.match(v) or len(v) > 64:
            raise ValueError(f"{v!r} must be 1-64 letters, digits, '_', '.' or '-'")
        return v

    @field_validator("reservation")
    @classmethod
    def _reservation(cls, v: str | None) -> str | None:
        if v is not None and not _WORD.match(v):
            raise ValueError(f"reservation {v!r} may hold only letters, digits, '_', '.', '-'")
        return v or None

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, v: str) -> str:
        if not _CONSTRAINT.match(v):
            raise ValueError(
                f"constraint {v!r} is not a Slurm feature expression (e.g. cpu, gpu, gpu&hbm80g)"
            )
        return v

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v: str) -> str:
        m = _WALLTIME.match(v)
        if not m:
            raise ValueError(f"walltime {v!r} must be HH:MM:SS or D-HH:MM:SS")
        days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
        if minutes >= 60 or seconds >= 60 or (days and hours >= 24):
            raise ValueError(f"walltime {v!r} has minutes/seconds >= 60 or hours >= 24 with days")
        if days == hours == minutes == seconds == 0:
            raise ValueError("walltime must be longer than 00:00:00")
        return v

    @field_validator("log_dir")
    @classmethod
    def _log_dir(cls, v: str) -> str:
        # sbatch does not expand $VARS or ~ in -o, and it does not create the directory.
        if not v or _UNSAFE_PATH.search(v):
            raise ValueError(
                f"log_dir {v!r} must be a plain path without spaces, quotes, $VARS or ~ "
                "(sbatch expands none of them): use an absolute path such as /pscratch/sd/u/user/logs"
            )
        return v

    @field_validator("extra_sbatch")
    @classmethod
    def _extra_sbatch(cls, lines: list[str]) -> list[str]:
        for line in lines:
            _check_option(line, "extra_sbatch")
            name = line.split("=", 1)[0].split()[0]
            if name in _MANAGED_SBATCH:
                owner = _MANAGED_SBATCH[name]
                where = f"the template {owner}" if owner.startswith("(") else f"slurm.{owner}"
                raise ValueError(f"extra_sbatch {line!r} repeats an option set by {where}")
        return lines

    @field_validator("srun_options")
    @classmethod
    def _srun_options(cls, opts: list[str]) -> list[str]:
        for opt in opts:
            _check_option(opt, "srun_options")
            if opt.split("=", 1)[0].split()[0] in _MANAGED_SRUN:
                raise ValueError(
                    f"srun_options {opt!r} changes the one-task-per-node layout the template sets"
                )
        return opts


def walltime_seconds(walltime: str) -> int:
    """A validated [D-]HH:MM:SS walltime in seconds."""
    days, hours, minutes, seconds = (int(g or 0) for g in _WALLTIME.match(walltime).groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _check_option(option: str, field: str) -> None:
    """An extra option must be one single-line option starting with '-'."""
    if not option.startswith("-") or "\n" in option or "\r" in option or "#" in option:
        raise ValueError(
            f"{field} entry {option!r} must be one option starting with '-', on one line, no '#'"
        )


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
    return name.endswith("_FILE") and value.startswith("/") and not _UNSAFE_PATH.search(value)


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
