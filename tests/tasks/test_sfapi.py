"""SfapiAllocator and allocate() with the real sfapi_client against the loopback fake SFAPI.

The fake really runs the batch script's srun line as local processes, so these tests see node streamers
start, and see cancel, NODE_FAIL and walltime end them. Every test also checks that no key, token or
client assertion shows up in the logs (autouse fixture) and, where an error is raised, in its text.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from stemstream_testing.fake_sfapi import FakeSfapi
from tasks.sfapi import (
    UNKNOWN,
    AllocationError,
    JobFailedError,
    JobStartTimeout,
    JobSubmitError,
    SfapiAllocator,
    SfapiCredentialsError,
    SfapiSettings,
    SfapiUnavailable,
    allocate,
)
from tasks.slurm import SlurmSettings, render_batch_script

from .helpers import CLIENT_ID, alive, wait_until

# Each task writes <marker dir>/<SLURM_PROCID> = "jobid nodeid child_pid exported", starts a child, then waits.
NODE_CODE = """\
import os, pathlib, subprocess, sys, time
child = subprocess.Popen(["sleep", "60"])
env = os.environ
line = f"{env['SLURM_JOB_ID']} {env['SLURM_NODEID']} {child.pid} {env['STEMSTREAM_TEST']}"
pathlib.Path(env["MARKERS"], env["SLURM_PROCID"]).write_text(line)
if env["SLURM_PROCID"] == env.get("FAIL_RANK"):
    sys.exit(3)
time.sleep(float(env.get("LIFETIME", "60")))
"""


def node_script(markers: Path, nodes: int = 3, walltime: str = "00:30:00", **env: str) -> str:
    """A batch script whose node command is NODE_CODE, with markers written into a fresh directory."""
    markers.mkdir()
    program = markers.parent / f"{markers.name}_node.py"
    program.write_text(NODE_CODE)
    slurm = SlurmSettings(account="m1234", nodes=nodes, walltime=walltime, log_dir="/pscratch/logs")
    exports = {"MARKERS": str(markers), "STEMSTREAM_TEST": "exported", **env}
    return render_batch_script(slurm, [sys.executable, str(program)], exports)


def markers_of(markers: Path) -> dict[int, list[str]]:
    return {int(p.name): p.read_text().split() for p in markers.iterdir()}


def error_text(exc: BaseException) -> str:
    """Everything a traceback of this error would print, the chained causes included."""
    return "".join(traceback.format_exception(exc))


def secrets_seen(fake: FakeSfapi, pem: str) -> list[str]:
    """Strings that must never be logged or put in an error: key lines, tokens, client assertions."""
    return [line for line in pem.splitlines() if "-----" not in line] + fake.issued_tokens + fake.assertions


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog: pytest.LogCaptureFixture, fake: FakeSfapi, sfapi_pem: str) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)  # every logger, httpx/httpcore/authlib included
    yield
    # caplog.text holds only the current phase (teardown) here, so collect every phase's records.
    formatter = logging.Formatter("%(name)s %(message)s")
    records = [r for phase in ("setup", "call", "teardown") for r in caplog.get_records(phase)]
    text = "\n".join(formatter.format(r) for r in records)
    leaked = [s[:12] + "..." for s in secrets_seen(fake, sfapi_pem) if s in text]
    assert not leaked, f"secrets in the logs: {leaked}"


def assert_clean(exc: BaseException, fake: FakeSfapi, pem: str) -> None:
    text = error_text(exc)
    assert not [s for s in secrets_seen(fake, pem) if s in text]


# ---- jobs really run ---------------------------------------------------------------------------
def test_submit_starts_one_process_per_node_and_cancel_kills_them(
    fake: FakeSfapi, sfapi_settings: SfapiSettings, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    with SfapiAllocator(sfapi_settings) as allocator:
        job_id = allocator.submit(node_script(markers, nodes=3))
        job = fake.jobs[job_id]
        assert job.qos == "realtime" and job.directives["account"] == "m1234" and job.nodes == 3
        assert allocator.state(job_id) == "PENDING"  # pending_polls=1
        assert allocator.wait_running(job_id) == "RUNNING"
        assert wait_until(lambda: len(list(markers.iterdir())) == 3)
        seen = markers_of(markers)
        assert sorted(seen) == [0, 1, 2]  # SLURM_PROCID
        assert {tuple(v[:2]) for v in seen.values()} == {(job_id, "0"), (job_id, "1"), (job_id, "2")}
        assert all(v[3] == "exported" for v in seen.values())  # the script's export reached the tasks
        children = [int(v[2]) for v in seen.values()]
        assert all(alive(pid) for pid in job.pids + children)

        allocator.cancel(job_id)

        assert allocator.state(job_id) == "CANCELLED"
        assert not any(alive(pid) for pid in job.pids + children)  # the tasks' children too
        assert job.exit_codes == [-15, -15, -15]
        allocator.cancel(job_id)  # idempotent: already gone is fine
    assert (fake.root / f"pscratch/logs/stemstream-nodes_{job_id}.out").exists()


def test_job_completes_when_every_task_exits_zero(
    fake: FakeSfapi, sfapi_settings: SfapiSettings, tmp_path: Path
) -> None:
    with SfapiAllocator(sfapi_settings) as allocator:
        job_id = allocator.submit(node_script(tmp_path / "m", nodes=2, LIFETIME="0.3"))
        allocator.wait_running(job_id)
        assert fake.wait_state(job_id, {"COMPLETED", "FAILED"}) == "COMPLETED"
        assert fake.jobs[job_id].exit_codes == [0, 0]
        assert allocator.state(job_id) == "COMPLETED"  # from sacct once it left squeue


def test_one_failing_task_fails_the_job_and_stops_the_others(
    fake: FakeSfapi, sfapi_settings: SfapiSettings, tmp_path: Path
) -> None:
    with SfapiAllocator(sfapi_settings) as allocator:
        job_id = allocator.submit(node_script(tmp_path / "m", nodes=3, FAIL_RANK="1"))
        allocator.wait_running(job_id)
        assert fake.wait_state(job_id, {"COMPLETED", "FAILED"}) == "FAILED"
        job = fake.jobs[job_id]
        codes = dict(zip(job.task_ids, job.exit_codes))
        assert codes[1] == 3 and codes[0] == codes[2] == -15  # --kill-on-bad-exit
        assert allocator.state(job_id) == "FAILED"


def test_walltime_ends_the_job(fake: FakeSfapi, sfapi_settings: SfapiSettings, tmp_path: Path) -> None:
    with SfapiAllocator(sfapi_settings) as allocator:
        job_id = allocator.submit(node_script(tmp_path / "m", nodes=1, walltime="00:00:01"))
        allocator.wait_running(job_id)
        assert fake.wait_state(job_id, {"TIMEOUT"}, timeout=5) == "TIMEOUT"
        assert not any(alive(pid) for pid in fake.jobs[job_id].pids)


# ---- allocate(): cancelled on every way out ------------------------------------------------------
@pytest.mark.parametrize("exit_with", [None, RuntimeError, KeyboardInterrupt])
def test_allocate_cancels_on_every_way_out(
    fake: FakeSfapi, sfapi_settings: SfapiSettings, tmp_path: Path, exit_with: type[BaseException] | None
) -> None:
    markers = tmp_path / "m"
    recorded: list[str] = []
    expected = pytest.raises(exit_with) if exit_with else contextlib.nullcontext()
    with (
        expected,
        allocate(sfapi_settings, node_script(markers, nodes=2), on_submitted=recorded.append) as job_id,
    ):
        assert recorded == [job_id] and fake.jobs[job_id].state == "RUNNING"
        assert wait_until(lambda: len(list(markers.iterdir())) == 2)
        if exit_with:
            raise exit_with("session ended badly")
    job = fake.jobs[recorded[0]]
    assert job.state == "CANCELLED"
    assert ("DELETE", f"/api/v1.2/compute/jobs/perlmutter/{job.jobid}") in fake.requests
    assert not any(alive(pid) for pid in job.pids)


def test_stuck_in_pending_times_out_and_is_cancelled(fake: FakeSfapi, sfapi_settings: SfapiSettings) -> None:
    fake.stuck_pending = True
    settings = sfapi_settings.model_copy(update={"start_timeout": 0.5})
    script = render_batch_script(SlurmSettings(account="m1"), ["true"])
    t = time.monotonic()
    with pytest.raises(JobStartTimeout) as info, allocate(settings, script):
        pytest.fail("must not be reached")
    assert time.monotonic() - t < 3
    [job] = fake.jobs.values()
    assert info.value.job_id == job.jobid and info.value.last_state == "PENDING"
    assert job.state == "CANCELLED"


@pytest.mark.parametrize("state", ["NODE_FAIL", "BOOT_FAIL", "DEADLINE", "REVOKED"])
def test_states_missing_from_the_clients_terminal_list_fail_fast(
    fake: FakeSfapi, sfapi_settings: SfapiSettings, state: str
) -> None:
    script = render_batch_script(SlurmSettings(account="m1"), ["true"])
    t = time.monotonic()
    with (
        pytest.raises(JobFailedError) as info,
        allocate(sfapi_settings, script, on_submitted=lambda j: fake.set_state(j, state)),
    ):
        pytest.fail("must not be reached")
    assert time.monotonic() - t < 2  # not the start timeout
    assert info.value.state == state
    [job] = fake.jobs.values()
    assert ("DELETE", f"/api/v1.2/compute/jobs/perlmutter/{job.jobid}") in fake.requests  # cancel attempted


def test_node_fail_while_running_kills_the_processes(
    fake: FakeSfapi, sfapi_settings: SfapiSettings, tmp_path: Path
) -> None:
    markers = tmp_path / "m"
    with SfapiAllocator(sfapi_settings) as allocator:
        job_id = allocator.submit(node_script(markers, nodes=2))
        allocator.wait_running(job_id)
        assert wait_until(lambda: len(list(markers.iterdir())) == 2)
        fake.set_state(job_id, "NODE_FAIL")
        assert not any(alive(pid) for pid in fake.jobs[job_id].pids)
        assert allocator.state(job_id) == "NODE_FAIL"
        allocator.cancel(job_id)  # already ended: logged, not raised


def test_direct_wait_running_cancels_on_timeout(fake: FakeSfapi, sfapi_settings: SfapiSettings) -> None:
    fake.stuck_pending = True
    with SfapiAllocator(sfapi_settings) as allocator:
        job_id = allocator.submit(render_batch_script(SlurmSettings(account="m1"), ["true"]))
        with pytest.raises(JobStartTimeout):
            allocator.wait_running(job_id, timeout=0.3)
        assert fake.jobs[job_id].state == "CANCELLED"


# ---- API faults --------------------------------------------------------------------------------------
def test_503s_are_retried_then_succeed(
    fake: FakeSfapi, sfapi_settings: SfapiSettings, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail_next_requests(3, 503)  # hits the token request and the first API calls
    script = render_batch_script(SlurmSettings(account="m1"), ["true"])
    with SfapiAllocator(sfapi_settings) as allocator:
        job_id = allocator.submit(script)
        fake.fail_next_requests(2, 502, route="compute/jobs")
        assert allocator.state(job_id) == "PENDING"
    assert len(fake.jobs) == 1
    assert caplog.text.count("retry") >= 5


def test_slurm_errors_in_queries_are_retried(fake: FakeSfapi, sfapi_settings: SfapiSettings) -> None:
    with SfapiAllocator(sfapi_settings) as allocator:
        job_id = allocator.submit(render_batch_script(SlurmSettings(account="m1"), ["true"]))
        fake.error_next_queries(2)
        assert allocator.wait_running(job_id) == "RUNNING"
        fake.error_next_queries(sfapi_settings.api_retries)  # exactly what one call may spend
        with pytest.raises(SfapiUnavailable, match="Socket timed out"):
            allocator.state(job_id)
        assert allocator.state(job_id) in ("RUNNING", "COMPLETED")


def test_submit_post_is_retried_only_when_it_cannot_have_reached_slurm(
    fake: FakeSfapi, sfapi_settings: SfapiSettings
) -> None:
    script = render_batch_script(SlurmSettings(account="m1"), ["true"])
    posts = lambda: [r for r in fake.requests if r == ("POST", "/api/v1.2/compute/jobs/perlmutter")]  # noqa: E731
    with SfapiAllocator(sfapi_settings) as allocator:
        fake.fail_next_requests(2, 503, route="compute/jobs")  # the gateway refused: safe to repeat
        allocator.submit(script)
        assert len(posts()) == 3 and len(fake.jobs) == 1
        fake.fail_next_requests(1, 500, route="compute/jobs")  # may have reached sbatch: never repeated
        with pytest.raises(JobSubmitError, match="not repeated"):
            allocator.submit(script)
        assert len(posts()) == 4 and len(fake.jobs) == 1


def test_revoked_token_is_renewed(fake: FakeSfapi, sfapi_settings: SfapiSettings) -> None:
    with SfapiAllocator(sfapi_settings) as allocator:
        job_id = allocator.submit(render_batch_script(SlurmSettings(account="m1"), ["true"]))
        fake.expire_tokens()
        assert allocator.state(job_id) == "PENDING"
        allocator.cancel(job_id)
    assert sum(1 for _, path in fake.requests if path == "/token") == 2


def test_short_lived_tokens_are_refreshed_by_the_client(
    fake: FakeSfapi, sfapi_settings: SfapiSettings
) -> None:
    fake.token_lifetime = 1  # below authlib's 60 s leeway: it fetches a new token before each request
    with SfapiAllocator(sfapi_settings) as allocator:
        job_id = allocator.submit(render_batch_script(SlurmSettings(account="m1"), ["true"]))
        allocator.cancel(job_id)
    assert sum(1 for _, path in fake.requests if path == "/token") >= 3


def test_unreachable_api_fails_in_bounded_time(
    sfapi_settings: SfapiSettings, fake: FakeSfapi, sfapi_pem: str
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = sfapi_settings.model_copy(
        update={
            "api_base_url": f"http://127.0.0.1:{port}/api/v1.2",
            "token_url": f"http://127.0.0.1:{port}/token",
            "api_timeout": 1.5,
            "api_retries": 50,
        }
    )
    t = time.monotonic()
    with pytest.raises(SfapiUnavailable, match="ConnectError") as info, SfapiAllocator(settings) as allocator:
        allocator.submit(render_batch_script(SlurmSettings(account="m1"), ["true"]))
    assert time.monotonic() - t < 3  # sfapi_client alone would retry for 65 s
    assert_clean(info.value, fake, sfapi_pem)


def test_slow_api_times_out_in_bounded_time(fake: FakeSfapi, sfapi_settings: SfapiSettings) -> None:
    settings = sfapi_settings.model_copy(update={"request_timeout": 0.2, "api_timeout": 1.0})
    with SfapiAllocator(settings) as allocator:
        job_id = allocator.submit(render_batch_script(SlurmSettings(account="m1"), ["true"]))
        fake.delay_responses(0.6)
        t = time.monotonic()
        with pytest.raises(SfapiUnavailable, match="ReadTimeout"):
            allocator.state(job_id)
        assert time.monotonic() - t < 3
        fake.delay_responses(0)
        allocator.cancel(job_id)


def test_unavailable_machine_is_not_submitted_to(fake: FakeSfapi, sfapi_settings: SfapiSettings) -> None:
    fake.status = "unavailable"
    with pytest.raises(SfapiUnavailable, match="unavailable"), SfapiAllocator(sfapi_settings) as allocator:
        allocator.submit(render_batch_script(SlurmSettings(account="m1"), ["true"]))
    assert not fake.jobs


def test_rejected_submission(fake: FakeSfapi, sfapi_settings: SfapiSettings) -> None:
    fake.reject_next_submit("Batch job submission failed: Invalid qos specification")
    with pytest.raises(JobSubmitError, match="Invalid qos"), SfapiAllocator(sfapi_settings) as allocator:
        allocator.submit(render_batch_script(SlurmSettings(account="m1"), ["true"]))


def test_not_a_script_is_refused_before_any_request(fake: FakeSfapi, sfapi_settings: SfapiSettings) -> None:
    with pytest.raises(JobSubmitError, match="#!"), SfapiAllocator(sfapi_settings) as allocator:
        allocator.submit("/global/homes/u/user/run.sh")
    assert not fake.requests


def test_unknown_job(fake: FakeSfapi, sfapi_settings: SfapiSettings) -> None:
    with SfapiAllocator(sfapi_settings) as allocator:
        assert allocator.state("123") == UNKNOWN
        allocator.cancel("123")  # nothing to cancel: fine


# ---- credentials -------------------------------------------------------------------------------------
def _jwk(pem: str) -> dict[str, str]:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    numbers = key.private_numbers()  # type: ignore[union-attr]

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()

    pub = numbers.public_numbers
    fields = {"n": pub.n, "e": pub.e, "d": numbers.d, "p": numbers.p, "q": numbers.q}
    fields |= {"dp": numbers.dmp1, "dq": numbers.dmq1, "qi": numbers.iqmp}
    return {"kty": "RSA", **{k: b64(v) for k, v in fields.items()}}


def _key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("form", ["jwk-secret", "pem-file", "sfapi-pem-file", "sfapi-json-file", "jwk-file"])
def test_credential_forms(
    fake: FakeSfapi, sfapi_settings: SfapiSettings, sfapi_pem: str, tmp_path: Path, form: str
) -> None:
    jwk = _jwk(sfapi_pem)
    update: dict[str, object] = {"secret": None}
    if form == "jwk-secret":
        update = {"secret": SecretStr(json.dumps(jwk))}
    elif form == "pem-file":
        update["key_path"] = _key_file(tmp_path / "key.pem", sfapi_pem)
    elif form == "sfapi-pem-file":  # sfapi's own format: the client id on the first line
        update |= {"client_id": "", "key_path": _key_file(tmp_path / "key", f"{CLIENT_ID}\n{sfapi_pem}")}
    elif form == "sfapi-json-file":
        text = json.dumps({"client_id": CLIENT_ID, "secret": jwk})
        update |= {"client_id": "", "key_path": _key_file(tmp_path / "key.json", text)}
    else:
        update["key_path"] = _key_file(tmp_path / "jwk.json", json.dumps(jwk))
    with SfapiAllocator(sfapi_settings.model_copy(update=update)) as allocator:
        assert allocator.state("1") == UNKNOWN  # authenticated round trip


def test_wrong_key_is_refused_without_leaking_it(
    fake: FakeSfapi, sfapi_settings: SfapiSettings, sfapi_pem: str
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    settings = sfapi_settings.model_copy(update={"secret": SecretStr(other_pem)})
    with (
        pytest.raises(SfapiCredentialsError, match="credentials refused") as info,
        SfapiAllocator(settings) as a,
    ):
        a.state("1")
    assert_clean(info.value, fake, other_pem)
    assert_clean(info.value, fake, sfapi_pem)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"secret": None}, "no SFAPI credentials"),
        ({"secret": SecretStr("not a key")}, "not an unencrypted PEM"),
        ({"secret": SecretStr("{not json")}, "not valid JSON"),
        ({"secret": SecretStr('{"kty": "RSA"}')}, "not a private RSA JWK"),
    ],
)
def test_bad_credentials_are_reported_clearly(
    sfapi_settings: SfapiSettings, update: dict[str, object], message: str
) -> None:
    with pytest.raises(SfapiCredentialsError, match=message):
        SfapiAllocator(sfapi_settings.model_copy(update=update))


def test_key_file_must_be_private(sfapi_settings: SfapiSettings, sfapi_pem: str, tmp_path: Path) -> None:
    path = _key_file(tmp_path / "key.pem", sfapi_pem, mode=0o644)
    with pytest.raises(SfapiCredentialsError, match="chmod 600") as info:
        SfapiAllocator(sfapi_settings.model_copy(update={"secret": None, "key_path": path}))
    assert sfapi_pem.splitlines()[1] not in error_text(info.value)


def test_missing_client_id(sfapi_settings: SfapiSettings) -> None:
    with pytest.raises(SfapiCredentialsError, match="client id"):
        SfapiAllocator(sfapi_settings.model_copy(update={"client_id": ""}))


def test_settings_never_show_the_secret(sfapi_settings: SfapiSettings, sfapi_pem: str) -> None:
    shown = repr(sfapi_settings) + str(sfapi_settings) + sfapi_settings.model_dump_json()
    assert sfapi_pem.splitlines()[1] not in shown


def test_unknown_machine_is_a_settings_error() -> None:
    with pytest.raises(ValueError, match="unknown SFAPI machine"):
        SfapiSettings(machine="hopper")


def test_errors_are_allocation_errors() -> None:
    for cls in (SfapiUnavailable, SfapiCredentialsError, JobSubmitError, JobFailedError, JobStartTimeout):
        assert issubclass(cls, AllocationError)


# ---- the fake's CLI --------------------------------------------------------------------------------
def test_fake_cli_prints_its_base_url(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stemstream_testing.fake_sfapi", "--root", str(tmp_path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/api/v1.2")
        assert httpx.get(f"{base_url}/status/perlmutter", timeout=5).json()["status"] == "active"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
