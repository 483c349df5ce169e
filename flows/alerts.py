"""Failure alerts: a Prefect automation that posts to a webhook when a session or experiment run fails.

Needs a long-lived Prefect server (`prefect server start`): automations run in its services, never on the
temporary server a bare flow call starts. Setting up twice replaces, never duplicates.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from urllib.parse import urlsplit

from prefect.automations import Automation, EventTrigger, Posture, SendNotification
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore
from prefect.settings import PREFECT_API_URL

from counting.errors import PermanentError

BLOCK_NAME = "stemstream-alert-webhook"
AUTOMATION_NAME = "stemstream-session-failed"
FLOW_NAMES = ("stemstream-session", "stemstream-experiment")
# Flow-run states that end a run badly (TimedOut is a Failed state with its own name and event).
FAILURE_EVENTS = (
    "prefect.flow-run.Failed",
    "prefect.flow-run.Crashed",
    "prefect.flow-run.TimedOut",
    "stemstream.node.lost",  # a node streamer lost mid-session: the session goes on, people should know
)

SUBJECT = "stemstream: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}"
BODY = (
    "Flow {{ flow.name }}, run {{ flow_run.name }} ({{ flow_run.id }}) entered {{ flow_run.state.name }}: "
    "{{ flow_run.state.message }}"
)


class ServerUnavailable(PermanentError, RuntimeError):
    """No Prefect server to set alerts up on: PREFECT_API_URL unset, or nothing answers there."""


def redact_url(url: str) -> str:
    """The URL without credentials, query or fragment: safe for logs and terminal output."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    tail = "?..." if parts.query else ""
    return f"{parts.scheme}://{host}{parts.path}{tail}"


def check_webhook(url: str) -> None:
    """ValueError unless the URL is http(s) with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the webhook must be an http(s) URL with a host, got {redact_url(url)!r}")


def check_server(timeout: float = 5.0) -> str:
    """The current PREFECT_API_URL, after checking that a server answers there; ServerUnavailable if not."""
    import httpx

    url = PREFECT_API_URL.value()
    if not url:
        raise ServerUnavailable(
            "PREFECT_API_URL is not set: alerts need a running server "
            "(prefect server start; export PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise ServerUnavailable(
            f"no Prefect server answers at {redact_url(url)} ({type(exc).__name__}): "
            "start one with `prefect server start` or fix PREFECT_API_URL"
        ) from None
    return url


def alert_automation(block_document_id: object, flow_names: Sequence[str] = FLOW_NAMES) -> AutomationCore:
    """The automation (not yet saved): any failure event of the named flows sends the block's notification."""
    return AutomationCore(
        name=AUTOMATION_NAME,
        description="Alert when a stemstream session or experiment run fails, crashes or times out",
        enabled=True,
        tags=["stemstream"],
        trigger=EventTrigger(
            expect=set(FAILURE_EVENTS),
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(flow_names)},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[SendNotification(block_document_id=block_document_id, subject=SUBJECT, body=BODY)],
        actions_on_trigger=[],  # all fields set: an update replaces whatever was edited in the UI
        actions_on_resolve=[],
    )


def setup_alerts(webhook_url: str, flow_names: Sequence[str] = FLOW_NAMES) -> Automation:
    """Create or replace the webhook block and the failure automation on the current Prefect server."""
    check_webhook(webhook_url)
    if isinstance(flow_names, str):
        flow_names = (flow_names,)
    if not flow_names:
        raise ValueError("give at least one flow name to watch")
    block = CustomWebhookNotificationBlock(
        name="stemstream",
        url=webhook_url,
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    )
    block_id = block.save(BLOCK_NAME, overwrite=True, _sync=True)  # sync even if an event loop is running
    core = alert_automation(block_id, tuple(flow_names))
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(AUTOMATION_NAME)
        if existing:
            automation_id = existing[0].id
            client.update_automation(automation_id, core)
            for extra in existing[1:]:  # duplicates made by hand (Automation.create twice): keep one
                client.delete_automation(extra.id)
        else:
            automation_id = client.create_automation(core)
    return Automation(id=automation_id, **core.model_dump())
