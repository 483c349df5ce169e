"""One SFAPI request: the client it goes through, and what its failure means.

The client is sfapi_client's with its own retries off (the allocator retries, bounded) and a settable request
timeout. A failure is classified (retry, renew the token, refuse the credentials, give up): a request that may
have reached Slurm is never repeated. It is described without secrets: the HTTP status and the URL path,
never headers or bodies.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

import httpx
import tenacity
from authlib.common.errors import AuthlibBaseError
from sfapi_client import Client
from sfapi_client.exceptions import ClientKeyError, SfApiError

from tasks.nersc.errors import AllocationError, JobSubmitError, SfapiRequestFailed, SfapiUnavailable


class BoundedClient(Client):
    """sfapi_client's Client with its own retries off (we retry, bounded) and a settable request timeout."""

    get = Client.get.retry_with(stop=tenacity.stop_after_attempt(1), reraise=True)
    post = Client.post.retry_with(stop=tenacity.stop_after_attempt(1), reraise=True)
    put = Client.put.retry_with(stop=tenacity.stop_after_attempt(1), reraise=True)
    delete = Client.delete.retry_with(stop=tenacity.stop_after_attempt(1), reraise=True)

    request_timeout: float = 10.0

    def _http_client(self) -> Any:
        # Overrides a private method of sfapi_client 0.6; if it is renamed, only the 5/10 s defaults remain.
        http = super()._http_client()
        http.timeout = httpx.Timeout(self.request_timeout)  # the client hard-codes 10 s (OAuth) or 5 s
        return http


class _ErrorReply(Exception):
    """SFAPI answered with status ERROR, e.g. squeue timing out on a busy slurmctld."""


def unless_error(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply, unless SFAPI answered status ERROR (e.g. slurmctld busy): then an error that is retried
    for idempotent requests."""
    if str(reply.get("status", "")).upper() == "ERROR":
        raise _ErrorReply(str(reply.get("error")))
    return reply


class Reaction(Enum):
    """What to do about a failed request."""

    TRANSIENT = "transient"  # retry with back-off
    EXPIRED = "expired"  # 401 from the API: new token, then retry once
    CREDENTIALS = "credentials"
    FATAL = "fatal"


def classify(exc: BaseException, idempotent: bool) -> Reaction:
    """How to react to an exception from one API request."""
    if isinstance(exc, tenacity.RetryError):
        last = exc.last_attempt.exception()
        return classify(last, idempotent) if last is not None else Reaction.TRANSIENT
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        if code == 401:
            return Reaction.EXPIRED
        if code == 403:
            return Reaction.CREDENTIALS
        if code == 429 or 500 <= code < 600:
            # 429/502/503 mean the request never reached the API behind the gateway; others may have.
            return Reaction.TRANSIENT if idempotent or code in (429, 502, 503) else Reaction.FATAL
        return Reaction.FATAL
    if isinstance(exc, httpx.TransportError):
        # A POST that may have reached the server must not be repeated; a refused connection never did.
        sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
        return Reaction.TRANSIENT if idempotent or not sent else Reaction.FATAL
    if isinstance(exc, AuthlibBaseError | ClientKeyError):
        return Reaction.CREDENTIALS
    if isinstance(exc, _ErrorReply):
        return Reaction.TRANSIENT if idempotent else Reaction.FATAL
    if isinstance(exc, json.JSONDecodeError):
        return Reaction.TRANSIENT if idempotent else Reaction.FATAL  # e.g. an HTML maintenance page
    return Reaction.FATAL


def describe(exc: BaseException) -> str:
    """A short, secret-free description of a failed request."""
    if isinstance(exc, tenacity.RetryError):
        last = exc.last_attempt.exception()
        return describe(last) if last is not None else "retries exhausted"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} from {exc.request.method} {exc.request.url.path}"
    if isinstance(exc, httpx.TransportError):
        return (
            f"{type(exc).__name__} ({exc}) on {exc.request.url.path}"
            if _has_request(exc)
            else type(exc).__name__
        )
    if isinstance(exc, _ErrorReply):
        return f"SFAPI error: {exc}"
    if isinstance(exc, SfApiError | ClientKeyError):
        return str(exc.message)
    if isinstance(exc, AuthlibBaseError):
        error = getattr(exc, "error", None) or type(exc).__name__
        description = getattr(
            exc, "description", None
        )  # the server's words, e.g. "signature does not verify"
        return f"token endpoint refused the client: {error}" + (f" ({description})" if description else "")
    return f"{type(exc).__name__}: {exc}"


def _has_request(exc: httpx.TransportError) -> bool:
    try:
        exc.request  # noqa: B018 — raises RuntimeError when the error has no request attached
    except RuntimeError:
        return False
    return True


def fatal_error(what: str, exc: Exception, idempotent: bool) -> AllocationError:
    """The error to raise for a failure that retrying will not fix."""
    if not idempotent and isinstance(
        exc, httpx.TransportError | httpx.HTTPStatusError | json.JSONDecodeError
    ):
        return JobSubmitError(
            f"SFAPI {what}: {describe(exc)}; the request may have reached Slurm, so it is not repeated: "
            "look for the job in squeue before resubmitting"
        )
    if isinstance(exc, SfApiError) and "unavailable" in str(exc.message):
        return SfapiUnavailable(f"SFAPI {what}: {describe(exc)}")
    return SfapiRequestFailed(f"SFAPI {what} failed: {describe(exc)}")
