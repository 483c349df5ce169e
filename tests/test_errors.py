"""One error hierarchy: every product exception is a StemstreamError on one branch, and retries retry only
TransientError (counting/errors.py)."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest
from prefect.states import Completed, Failed

from counting.errors import PermanentError, StemstreamError, TransientError

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("counting", "streaming", "tasks", "flows")
# Bases of a family that callers catch as a whole; each of their subclasses picks a branch, and the base
# itself is never raised (checked below), so it sits on neither.
FAMILIES = {"tasks.nersc.errors.AllocationError", "tasks.ssh.RemoteError"}


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def product_exceptions() -> list[type[BaseException]]:
    """Every public exception class defined in the product packages (all their modules imported)."""
    for package in PRODUCT:
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, f"{package}."):
            importlib.import_module(info.name)
    found: dict[str, type[BaseException]] = {}
    todo: list[type] = [BaseException]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if (
            cls.__module__.split(".")[0] in PRODUCT
            and not cls.__name__.startswith("_")
            and not issubclass(cls, Warning)
        ):
            found[_name(cls)] = cls
    return [found[k] for k in sorted(found)]


EXCEPTIONS = product_exceptions()


def test_the_walk_finds_the_product_exceptions() -> None:
    names = {_name(c) for c in EXCEPTIONS}
    assert {
        "counting.raw.layout.RawFormatError",
        "tasks.nersc.errors.SfapiUnavailable",
        "tasks.ssh.RemoteError",
    } <= names
    assert len(names) >= 20, sorted(names)


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=_name)
def test_every_product_exception_is_a_stemstream_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, StemstreamError), f"{_name(cls)} does not derive from StemstreamError"


@pytest.mark.parametrize("cls", [c for c in EXCEPTIONS if c.__module__ != "counting.errors"], ids=_name)
def test_every_product_exception_is_on_exactly_one_branch(cls: type[BaseException]) -> None:
    branches = [b.__name__ for b in (TransientError, PermanentError) if issubclass(cls, b)]
    if _name(cls) in FAMILIES:
        assert branches == [], f"family base {_name(cls)} must leave the branch to its subclasses"
    else:
        assert len(branches) == 1, f"{_name(cls)} is on {branches or 'no branch'}"


def test_family_bases_are_never_raised_themselves() -> None:
    names = "|".join(f.rsplit(".", 1)[1] for f in FAMILIES)
    direct = re.compile(rf"\b(?:raise|return)\s+(?:{names})\(")
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for package in PRODUCT
        for path in sorted((ROOT / package).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if direct.search(line)
    ]
    assert not hits, "raise a subclass on a branch instead:\n" + "\n".join(hits)


def test_callers_can_still_catch_the_builtin_bases() -> None:
    from counting.raw import RawFormatError
    from tasks.acquisition.monitor import MonitorTimeout
    from tasks.nersc.sfapi import AllocationError, SfapiUnavailable

    assert issubclass(RawFormatError, ValueError) and issubclass(RawFormatError, PermanentError)
    assert issubclass(MonitorTimeout, TimeoutError) and issubclass(MonitorTimeout, TransientError)
    assert issubclass(SfapiUnavailable, AllocationError) and issubclass(AllocationError, RuntimeError)


# ---- the retry rule ------------------------------------------------------------------------------------
def _retry(exc: BaseException) -> bool:
    from tasks.steps.session import _retry_transient

    return _retry_transient(None, None, Failed(data=exc))  # what Prefect hands retry_condition_fn


def test_transient_errors_are_retried() -> None:
    from tasks.acquisition.monitor import MonitorTimeout
    from tasks.nersc.sfapi import SfapiUnavailable
    from tasks.ssh import RemoteTimeout, RemoteUnreachable

    for exc in (
        TransientError("x"),
        SfapiUnavailable("SFAPI submit failed 6 time(s): HTTP 503"),
        RemoteUnreachable("cannot open an SSH session"),
        RemoteTimeout("exceeded 5 s"),
        MonitorTimeout("no heartbeat"),
    ):
        assert _retry(exc) is True, repr(exc)


def test_permanent_errors_are_not_retried() -> None:
    from tasks.nersc.batch import SlurmConfigError
    from tasks.nersc.sfapi import JobFailedError, JobStartTimeout, JobSubmitError, SfapiCredentialsError
    from tasks.ssh import AuthenticationFailed, HostKeyRejected, RemoteCommandFailed

    for exc in (
        PermanentError("x"),
        JobFailedError("123", "NODE_FAIL"),
        JobStartTimeout("123", 600, "PENDING"),
        JobSubmitError("outcome unknown"),
        SfapiCredentialsError("refused"),
        SlurmConfigError("no account"),
        HostKeyRejected("CHANGED"),
        AuthenticationFailed("refused the key"),
        RemoteCommandFailed("false", 1, ""),
    ):
        assert _retry(exc) is False, repr(exc)


@pytest.mark.parametrize(
    "exc", [KeyError("scan"), TypeError("bug"), RuntimeError("?"), TimeoutError("task"), OSError(5, "EIO")]
)
def test_bugs_and_untyped_errors_are_not_retried(exc: BaseException) -> None:
    assert _retry(exc) is False


def test_a_completed_state_is_not_retried() -> None:
    from tasks.steps.session import _retry_transient

    assert _retry_transient(None, None, Completed(data=1)) is False


# ---- the CLI -------------------------------------------------------------------------------------------
def test_the_cli_prints_any_stemstream_error_as_one_error_line(capsys: pytest.CaptureFixture) -> None:
    import typer

    from flows.cli import user_errors

    @user_errors
    def command() -> None:
        raise TransientError("SFAPI unreachable for [node0] after 6 tries")  # brackets are not markup

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == 1
    captured = capsys.readouterr()
    assert captured.err == "error: SFAPI unreachable for [node0] after 6 tries\n" and captured.out == ""


def test_the_cli_lets_a_bug_show_its_traceback() -> None:
    from flows.cli import user_errors

    @user_errors
    def command() -> None:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        command()
