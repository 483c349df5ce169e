"""The node-streamer batch script: golden file, quoting, validation, what the fake SFAPI reads from it, and
what a real sbatch says of it (the loopback Slurm cluster)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from stemstream_testing.fake_sfapi import parse_exports, parse_sbatch, parse_srun, srun_lines
from stemstream_testing.slurm_cluster import SlurmCluster
from tasks.nersc.batch import SlurmConfigError, render_batch_script
from tasks.settings import SlurmSettings

GOLDEN = Path(__file__).parent / "golden" / "node_streamers.sh"


def _golden_inputs() -> tuple[SlurmSettings, list[str], dict[str, str]]:
    slurm = SlurmSettings(
        account="m1234",
        nodes=4,
        walltime="01:30:00",
        job_name="stemstream-nodes",
        reservation="ncem_rt",
        log_dir="/pscratch/sd/u/user/stemstream_logs",
        extra_sbatch=["--mail-type=END"],
        srun_options=["-c 256", "--cpu-bind=cores"],
    )
    command = ["stemstream", "node", "--aggregator", "tcp://128.3.0.10:6000", "--label", "session 7"]
    env = {"STEMSTREAM_LOG_LEVEL": "INFO", "HDF5_USE_FILE_LOCKING": "FALSE", "NOTE": "it's quoted"}
    return slurm, command, env


def test_golden_file() -> None:
    script = render_batch_script(*_golden_inputs())
    if os.environ.get("STEMSTREAM_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text(), (
        "rendered script changed; rerun with STEMSTREAM_UPDATE_GOLDEN=1 if intended"
    )


def test_rendered_script_is_valid_bash() -> None:
    script = render_batch_script(*_golden_inputs())
    subprocess.run(["bash", "-n"], input=script.encode(), check=True)


def test_rendered_script_as_slurm_reads_it() -> None:
    """What sbatch and srun would see, read back with the fake SFAPI's parser."""
    slurm, command, env = _golden_inputs()
    script = render_batch_script(slurm, command, env)
    directives = parse_sbatch(script)
    assert directives == {
        "qos": "realtime",
        "account": "m1234",
        "constraint": "cpu",
        "nodes": "4",
        "time": "01:30:00",
        "job_name": "stemstream-nodes",
        "exclusive": "1",
        "no_requeue": "1",
        "output": "/pscratch/sd/u/user/stemstream_logs/%x_%j.out",
        "reservation": "ncem_rt",
        "--mail-type": "END",
    }
    assert parse_exports(script) == env  # quoting round-trips
    [line] = srun_lines(script)
    step = parse_srun(line, job_nodes=4)
    assert (step.nodes, step.ntasks, step.kill_on_bad_exit) == (4, 4, True)
    assert step.argv == command  # the space in "session 7" survived as one argument


def test_real_sbatch_accepts_the_rendered_script(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """sbatch --test-only (nothing is submitted) on the loopback cluster: every option is one Slurm knows."""
    slurm = SlurmSettings(
        account="m1234", nodes=2, walltime="00:05:00", log_dir=str(tmp_path), extra_sbatch=["--mail-type=END"]
    )
    script = render_batch_script(slurm, ["stemstream", "node"], {"HDF5_USE_FILE_LOCKING": "FALSE"})
    proc = slurm_cluster.run(["sbatch", "--test-only"], input=script, check=False, cwd=tmp_path)
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr
    unknown_feature = render_batch_script(
        slurm.model_copy(update={"constraint": "gpu"}), ["stemstream", "node"]
    )
    proc = slurm_cluster.run(["sbatch", "--test-only"], input=unknown_feature, check=False, cwd=tmp_path)
    assert proc.returncode != 0 and "Invalid feature specification" in proc.stderr, proc.stderr


def test_minimal_script_has_no_optional_lines() -> None:
    script = render_batch_script(SlurmSettings(account="m1"), "stemstream node --port 6000")
    assert "--reservation" not in script and "export " not in script and "\n\n\n" not in script
    assert script.rstrip().endswith(
        "srun -N 4 --ntasks-per-node=1 --kill-on-bad-exit=1 stemstream node --port 6000"
    )
    assert "#SBATCH -o ./%x_%j.out" in script


def test_account_is_required() -> None:
    with pytest.raises(SlurmConfigError, match="slurm.account is not set"):
        render_batch_script(SlurmSettings(), ["stemstream", "node"])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("walltime", "30:00", "HH:MM:SS"),
        ("walltime", "00:61:00", ">= 60"),
        ("walltime", "00:00:00", "longer than"),
        ("nodes", 0, "greater than or equal to 1"),
        ("account", "m1234; rm -rf /", "only letters"),
        ("qos", "real time", "letters, digits"),
        ("job_name", "a" * 65, "1-64"),
        ("log_dir", "$PSCRATCH/logs", "expands none"),
        ("log_dir", "~/logs", "expands none"),
        ("log_dir", "/my logs", "without spaces"),
        ("constraint", "cpu gpu", "feature expression"),
        ("reservation", "a b", "only letters"),
        ("extra_sbatch", ["-N 8"], "slurm.nodes"),
        ("extra_sbatch", ["--time=01:00:00"], "slurm.walltime"),
        ("extra_sbatch", ["mail-type=END"], "starting with '-'"),
        ("extra_sbatch", ["--comment=a\n#SBATCH -N 99"], "one line"),
        ("srun_options", ["--ntasks-per-node=2"], "one-task-per-node"),
    ],
)
def test_validation_errors_are_clear(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SlurmSettings(**{"account": "m1", field: value})


def test_walltime_with_days_is_accepted() -> None:
    assert SlurmSettings(walltime="1-12:00:00").walltime == "1-12:00:00"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SFAPI_SECRET": "x"}, "looks like a secret"),
        ({"ACCESS_TOKEN": "x"}, "looks like a secret"),
        ({"CURVE_SECRET_FILE": "s3cr3t-not-a-path"}, "looks like a secret"),
        ({"CURVE_SECRET_FILE": "/keys/a b"}, "looks like a secret"),
        ({"KEY": "-----BEGIN PRIVATE KEY-----\nabc"}, "looks like a secret"),
        ({"BAD-NAME": "x"}, "not a valid shell name"),
        ({"MULTI": "a\nb"}, "single line"),
    ],
)
def test_secrets_and_bad_env_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(SlurmConfigError, match=message):
        render_batch_script(SlurmSettings(account="m1"), ["stemstream", "node"], env)


def test_the_path_of_a_key_file_is_not_a_secret() -> None:
    name = "STEMSTREAM_STREAMING__CURVE__CLIENT_SECRET_FILE"
    script = render_batch_script(
        SlurmSettings(account="m1"), ["node"], {name: "/global/keys/node.key_secret"}
    )
    assert f"export {name}=/global/keys/node.key_secret" in script


def test_secret_values_never_reach_the_script() -> None:
    with pytest.raises(SlurmConfigError) as info:
        render_batch_script(SlurmSettings(account="m1"), ["node"], {"CURVE_SECRET": "s3cr3t-value"})
    assert "s3cr3t-value" not in str(info.value)


@pytest.mark.parametrize("command", ["", "   ", [], "node\nrm -rf /"])
def test_bad_node_command(command: list[str] | str) -> None:
    with pytest.raises(SlurmConfigError, match="node_command"):
        render_batch_script(SlurmSettings(account="m1"), command)
