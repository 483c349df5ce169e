"""The tasks' settings sections (pure pydantic); composed into the one Settings object in flows/settings.py.

Apart from the code that uses them so that building settings never imports the runtime: the SFAPI client
(httpx, authlib), paramiko, h5py, py4DSTEM or the microscope readers (ncempy).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator

# The values of sfapi_client.compute.Machine, written out so that loading settings never imports the
# client (tests/test_layout.py checks they still match).
SFAPI_MACHINES = ("dtn01", "dtns", "perlmutter")

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
# [D-]HH:MM:SS; tasks.nersc.batch reads the same form back.
WALLTIME = re.compile(r"^(?:(\d+)-)?(\d{1,2}):(\d{2}):(\d{2})$")
# Characters sbatch would not take literally in a path (it expands nothing, quotes nothing).
UNSAFE_PATH = re.compile(r"[\s'\"$`\\~#;&|<>*?]")


class SfapiSettings(BaseModel):
    """How to reach SFAPI and how long to wait for it; the key is a secret or a 0600 key file."""

    api_base_url: str = Field("https://api.nersc.gov/api/v1.2", description="the Superfacility API")
    token_url: str = Field("https://oidc.nersc.gov/c2id/token", description="where SFAPI tokens come from")
    client_id: str = Field("", description="SFAPI client id; may come from the key file instead")
    key_path: Path | None = Field(
        None,
        description="0600 file: a PEM, a JWK JSON, sfapi's 'client_id line + PEM' or {client_id, secret} JSON",
    )
    secret: SecretStr | None = Field(None, description="the private key itself: a PEM or a JWK as JSON")
    machine: str = Field("perlmutter", description="the SFAPI compute machine the nodes run on")
    poll_interval: float = Field(5.0, gt=0, description="seconds between job-state queries")
    submit_timeout: float = Field(
        120.0, gt=0, description="seconds for sbatch (the SFAPI task) to return a job id"
    )
    start_timeout: float = Field(
        1800.0,
        gt=0,
        description="seconds the session waits for its job to start (the realtime queue: usually seconds, "
        "rarely up to ~25 min); then the job is cancelled and the session fails",
    )
    pending_log_interval: float = Field(
        60.0, gt=0, description="seconds between reports of the pending time and Slurm's reason"
    )
    api_timeout: float = Field(60.0, gt=0, description="seconds one API operation may take, retries included")
    request_timeout: float = Field(10.0, gt=0, description="seconds one HTTP request may take")
    api_retries: int = Field(6, ge=1, description="attempts per API operation")
    retry_backoff: float = Field(1.0, gt=0, description="first back-off in seconds; doubles, at most 10 s")

    @field_validator("machine")
    @classmethod
    def _machine(cls, v: str) -> str:
        if v not in SFAPI_MACHINES:
            raise ValueError(f"unknown SFAPI machine {v!r}; e.g. perlmutter")
        return v

    @field_validator("key_path")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser()


class SlurmSettings(BaseModel):
    """What the node-streamer allocation asks Slurm for (Perlmutter realtime QOS by default)."""

    account: str = Field("", description="NERSC project that holds the realtime grant, e.g. m1234")
    qos: str = Field("realtime", description="Slurm QOS (sbatch -q); realtime needs a grant")
    constraint: str = Field("cpu", description="Perlmutter node type: cpu or gpu")
    nodes: int = Field(4, ge=1, le=4096, description="nodes to allocate; one node streamer per node")
    walltime: str = Field("00:30:00", description="[D-]HH:MM:SS")
    job_name: str = Field("stemstream-nodes", description="Slurm job name (sbatch -J)")
    reservation: str | None = Field(None, description="Slurm reservation (sbatch --reservation), if any")
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
        m = WALLTIME.match(v)
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
        if not v or UNSAFE_PATH.search(v):
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


def _check_option(option: str, field: str) -> None:
    """An extra option must be one single-line option starting with '-'."""
    if not option.startswith("-") or "\n" in option or "\r" in option or "#" in option:
        raise ValueError(
            f"{field} entry {option!r} must be one option starting with '-', on one line, no '#'"
        )


class SshSettings(BaseModel):
    """How to reach one host by SSH (the aggregator host); its host key is pinned in known_hosts."""

    host: str = Field("localhost", description="the host to log in to")
    port: int = Field(22, ge=1, le=65535, description="its SSH port")
    user: str = Field("", description="login name; empty means the local user")
    key_path: Path = Field(
        Path("~/.ssh/id_ed25519"), validate_default=True, description="private key for the login"
    )
    key_passphrase: SecretStr | None = Field(None, description="passphrase of an encrypted private key")
    known_hosts: Path = Field(
        Path("~/.ssh/known_hosts"),
        validate_default=True,
        description="pinned host keys; unknown hosts are refused",
    )
    connect_timeout: float = Field(10.0, gt=0, description="seconds to connect and log in")
    command_timeout: float = Field(60.0, gt=0, description="seconds one remote command may take")

    @field_validator("key_path", "known_hosts")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()


class AnalysisSettings(BaseModel):
    """How counted scans are analysed (tasks.analysis.analyse)."""

    keep_flyback: bool = Field(
        False,
        description="analyse the flyback column too (the last scan column, recorded while the beam flies "
        "back); by default it is dropped, as stempy's SparseArray.from_hdf5(keep_flyback=False) does",
    )


# Where the convergence semi-angle is looked for in a DM4's image tags, in order. Gatan's GMS has no
# standard tag for it: NCEM's 4D Camera acquisition script writes its own "4Dcamera Parameters" group
# (scan_number, nread, nskip, nflyback), and the semi-angle belongs there; the second is the form other
# sites use. A missing tag falls back on microscope.convergence_semiangle_mrad, then "uncalibrated".
CONVERGENCE_TAGS = [
    "4Dcamera Parameters.convergence_semiangle_mrad",
    "Microscope Info.Convergence Semi-angle (mrad)",
]


class MicroscopeSettings(BaseModel):
    """Where the microscope's own record of each scan (a DM4 with the HAADF image and its calibrations, or
    a JSON sidecar) is found, and how it is read."""

    dir: Path | None = Field(
        None,
        description="directory where the microscope saves its file per scan (NCEM: the Distiller sync "
        "directory); none: no microscope metadata is looked for",
    )
    pattern: str = Field(
        "scan{scan}.dm4",
        description="file name of a scan's microscope file, {scan} the scan number (format spec allowed, "
        "e.g. scan{scan:05d}.dm4); a glob pattern (* ?) is matched as such. .dm4/.dm3 are read with "
        "ncempy, .json as a sidecar",
    )
    window: float = Field(
        3600.0,
        gt=0,
        description="seconds: the file's modification time must be within this of the scan's data, so an "
        "old file of a reused scan number is never taken",
    )
    wait: float = Field(
        10.0,
        ge=0,
        description="seconds to wait for the file after the scan is written (the microscope saves it "
        "after its own scan ends)",
    )
    format: Literal["auto", "dm4", "json"] = Field("auto", description="auto: by the file's suffix")
    convergence_tags: list[str] = Field(
        default_factory=lambda: list(CONVERGENCE_TAGS),
        description="image-tag paths (dot-separated, under ImageTags) holding the convergence semi-angle "
        "in mrad, tried in order",
    )
    convergence_semiangle_mrad: float | None = Field(
        None,
        gt=0,
        description="the convergence semi-angle when the microscope's file has none (an aperture the "
        "session uses throughout); none: such scans are analysed uncalibrated in reciprocal space",
    )
    voltage_tag: str = Field("Microscope Info.Voltage", description="image-tag path of the voltage, V")
