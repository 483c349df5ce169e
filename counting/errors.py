"""The root of every stemstream exception, and its two branches: transient and permanent.

Every exception the product raises on purpose derives from :class:`StemstreamError`, through exactly one
of two branches, chosen by what a retry could do:

* :class:`TransientError`: the same call may succeed later (a service unreachable, a timeout, a 5xx).
* :class:`PermanentError`: retrying cannot help (bad input, bad config, refused credentials, a job that
  failed); it only delays the error.

Two rules follow, and nothing else decides them:

* Retries (the Prefect steps' ``retry_condition_fn``, see ``tasks/steps/session.py``) retry ``TransientError``
  only. Anything else, a ``PermanentError`` or a bug such as a ``KeyError``, fails the step at once.
  Code that talks to a service wraps the transport's own errors (httpx, paramiko, sockets) into its
  typed transient errors, so no third-party type needs to be named by a retry condition.
* The CLI prints any ``StemstreamError`` as one ``error: <message>`` line and exits non-zero, with no
  traceback; so messages are written for the person at the terminal and never hold secrets.

A family base such as ``AllocationError`` or ``RemoteError`` derives from ``StemstreamError`` only, so
callers can catch the family, and is never raised itself: its subclasses pick the branch. Product classes
keep a builtin base (``ValueError``, ``TimeoutError``, ...) where callers catch that, e.g.
``class RawFormatError(PermanentError, ValueError)``.

This module sits in the lowest layer (counting) so that every layer can use it.
"""

from __future__ import annotations

__all__ = ["PermanentError", "StemstreamError", "TransientError"]


class StemstreamError(Exception):
    """Root of every stemstream exception; the CLI prints it as one `error:` line."""


class TransientError(StemstreamError):
    """May succeed if retried: a service unreachable, a timeout, a 5xx; the only kind retries retry."""


class PermanentError(StemstreamError):
    """Retrying cannot help: bad input, bad config, refused credentials, a job that failed."""
