"""The Prefect UI in a real browser, as microscopists use it: headless Debian Chromium (through chromedriver)
against a real `prefect server` with the deployments of prefect.yaml and a process worker.

One server, worker and browser for the module. The session is started from the deployment's run form
(Custom run) with tiny parameters; while it runs, the form is checked for every parameter with its
description and default; then the finished run's page must show its logs (every line the API has), the
"session-summary" table with one row per scan, and the analysis artifacts' images, loaded.

The UI (the V2 React UI, Prefect's default) animates transitions and loads data after the page: every
step waits on an element or condition, bounded, never on a time budget. Screenshots of each page are in
this module's pytest tmp directory (`ui/*.png`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.keys import Keys

from stemstream_testing.browser import Browser, BrowserTimeout, headless_chromium
from tests.flows.prefect_processes import SESSION_DEPLOYMENT, PrefectStack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Small enough to finish in well under a minute on two cores, with the analysis on so that images exist.
TINY = {"n_scans": 2, "scan_width": 16, "scan_height": 16, "nodes": 1}
RUN_TIMEOUT = 150  # seconds for the session run, from the click on Submit to a final state


@dataclass
class Ui:
    stack: PrefectStack
    browser: Browser
    shots: Path  # screenshots
    v2: str  # the root of the UI a new browser gets (V2), e.g. http://127.0.0.1:PORT/v2

    def api(self, method: str, path: str, body: dict | None = None) -> object:
        r = httpx.request(method, f"{self.stack.api}{path}", json=body, timeout=10)
        r.raise_for_status()
        return r.json()


@dataclass
class SubmittedRun:
    id: str
    name: str
    deployment: dict


def _norm(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory, shared_prefect_stack) -> Iterator[Ui]:
    """Server (with its UI), `prefect deploy --all`, a worker (the stack shared with the analyse deployment's
    test), and a browser on the UI's start page."""
    work = tmp_path_factory.mktemp("prefect_ui")
    shots = work / "ui"
    stack = shared_prefect_stack.get()
    with headless_chromium(work / "browser", timeout=30) as browser:
        browser.open(f"{stack.url}/")
        # A browser with no saved preference is sent to the V2 UI (PREFECT_SERVER_UI_V2_ENABLED's default).
        browser.wait_until(lambda: "/v2/" in browser.url, "the redirect to the default (V2) UI")
        browser.wait_for_xpath("//a[normalize-space()='Deployments']")
        print(f"\n[ui] screenshots and logs in {work}")
        yield Ui(stack, browser, shots, f"{stack.url}/v2")


def _open_run_form(ui: Ui, deployment_id: str) -> None:
    """Deployment page -> Run -> Custom run, as a user does; returns once the form's parameters show."""
    b = ui.browser
    b.open(f"{ui.v2}/deployments/deployment/{deployment_id}")
    b.click(b.wait_for_xpath("//button[normalize-space()='Run']"))
    b.click(b.wait_for_xpath("//*[@role='menuitem' and contains(normalize-space(), 'Custom run')]"))
    b.wait_for_xpath("//label[starts-with(normalize-space(), 'frame_rate')]")  # the last parameter


def _control_for(b: Browser, label_text: str):
    """The input a form label names (label[for] -> element id)."""
    label = b.wait_for_xpath(
        f"//label[normalize-space()='{label_text}' or starts-with(normalize-space(), '{label_text} ')]"
    )
    return b.driver.find_element("id", label.get_attribute("for"))


def _type(b: Browser, label_text: str, value: object) -> None:
    """Replace a text or number input's value by typing, as a user does (React sees every key)."""
    control = _control_for(b, label_text)
    control.send_keys(Keys.CONTROL, "a")
    control.send_keys(str(value))
    b.wait_until(lambda: control.get_attribute("value") == str(value), f"{label_text} = {value}")


@pytest.fixture(scope="module")
def submitted(ui: Ui) -> SubmittedRun:
    """A session run started from the deployment's Custom run form with TINY parameters; the browser is left
    on the run's page (opened from the deployment's run list) while the run goes on."""
    b = ui.browser
    dep = ui.api("GET", f"/deployments/name/{SESSION_DEPLOYMENT}")
    _open_run_form(ui, dep["id"])
    name = f"ui-test-{uuid.uuid4().hex[:8]}"
    _type(b, "Run Name", name)
    for param, value in TINY.items():
        _type(b, param, value)
    b.screenshot(ui.shots / "run_form_filled.png", full_page=True)
    run_id = _submit(ui, name)
    b.wait_until(lambda: "/runs/flow-run/" in b.url, "the flow run's page")
    assert run_id in b.url, f"the run's page is not {name}'s ({run_id}): {b.url}"
    b.wait_for_xpath(f"//*[normalize-space()='{name}']")
    return SubmittedRun(run_id, name, dep)


def _runs_named(ui: Ui, name: str) -> list[dict]:
    found = ui.api("POST", "/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})
    assert isinstance(found, list)
    return found


def _submit(ui: Ui, name: str, tries: int = 3) -> str:
    """Click Submit, then open the new run from the deployment's run list, as a user does; return its id.

    On a loaded machine a click can land before the form is ready and do nothing (the form stays up and the
    server has no run by that name): the user clicks again, at most `tries` times. The server's run list is
    the witness, so a run is never submitted twice."""
    b = ui.browser
    for attempt in range(1, tries + 1):
        b.click(b.wait_for_xpath("//button[normalize-space()='Submit']"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _runs_named(ui, name):
            time.sleep(0.5)
        runs = _runs_named(ui, name)
        if runs:
            break
        b.screenshot(ui.shots / f"submit_ignored_{attempt}.png", full_page=True)
    else:
        pytest.fail(f"{tries} clicks on Submit created no run named {name}; screenshots in {ui.shots}")
    assert len(runs) == 1, f"{len(runs)} runs named {name}"
    # Submit goes back to the deployment's page, where the new run is listed by its name.
    b.click(b.wait_for_xpath(f"//a[normalize-space()='{name}']", timeout=60))
    return runs[0]["id"]


@pytest.fixture(scope="module")
def finished(ui: Ui, submitted: SubmittedRun) -> SubmittedRun:
    """The submitted run, Completed (the API says so), and its page shows it Completed."""
    b = ui.browser
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        run = ui.api("GET", f"/flow_runs/{submitted.id}")
        state = run["state"]["type"] if run.get("state") else None
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"run {submitted.name} still {state} after {RUN_TIMEOUT} s\n{ui.stack.log_tails()}")
        time.sleep(1)
    assert state == "COMPLETED", f"{run['state']}\n{ui.stack.log_tails()}"
    if "/runs/flow-run/" not in b.url:
        b.open(f"{ui.v2}/runs/flow-run/{submitted.id}")
    b.wait_for_xpath("//span[@data-slot='badge' and normalize-space()='Completed']", timeout=30)
    return submitted


def test_run_form_starts_a_session_with_the_typed_parameters(ui: Ui, submitted: SubmittedRun) -> None:
    run = ui.api("GET", f"/flow_runs/{submitted.id}")
    assert run["name"] == submitted.name
    assert run["deployment_id"] == submitted.deployment["id"]
    expected = {**submitted.deployment["parameters"], **TINY}
    assert {k: run["parameters"].get(k) for k in expected} == expected, run["parameters"]


def test_run_form_shows_every_parameter_with_its_description_and_default(
    ui: Ui, submitted: SubmittedRun
) -> None:
    """Checked on a fresh form while the submitted run goes on in the background."""
    b = ui.browser
    dep = submitted.deployment
    props = dep["parameter_openapi_schema"]["properties"]
    defaults = {name: prop.get("default") for name, prop in props.items()} | dep["parameters"]
    _open_run_form(ui, dep["id"])
    # Every label of the form: its text, the description under it, and what its control shows.
    fields = b.js(
        """
        return Array.from(document.querySelectorAll('label[for]')).map(label => {
            const control = document.getElementById(label.htmlFor);
            const description = label.parentElement.querySelector('p');
            return {
                label: label.innerText,
                description: description ? description.innerText : null,
                tag: control ? control.tagName : null,
                role: control ? control.getAttribute('role') : null,
                value: control ? (control.tagName === 'INPUT' ? control.value : control.innerText) : null,
                checked: control ? control.getAttribute('aria-checked') : null,
            };
        });
        """
    )
    by_name = {f["label"].split()[0]: f for f in fields if f["label"].split()}
    missing = sorted(set(props) - set(by_name))
    assert not missing, f"parameters missing from the run form: {missing}; labels: {sorted(by_name)}"
    for name, prop in props.items():
        field = by_name[name]
        assert field["description"] is not None, f"{name}: no description shown"
        assert _norm(field["description"]) == _norm(prop["description"]), (name, field, prop["description"])
        default = defaults[name]
        if field["role"] == "switch":
            shown: object = field["checked"] == "true"
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            shown = float(field["value"]) if field["value"] not in ("", None) else None
            default = float(default)
        else:
            shown = field["value"].strip() if field["value"] is not None else None
        assert shown == default, (
            f"{name}: the form shows {field['value']!r} (checked {field['checked']}), default {default!r}"
        )
    b.screenshot(ui.shots / "run_form.png", full_page=True)


def test_finished_run_shows_its_logs(ui: Ui, finished: SubmittedRun) -> None:
    """Every log line the API holds for the run is shown on its Logs tab (a virtualised list: scrolled
    through, collecting what each scroll position renders)."""
    b = ui.browser
    logs = ui.api(
        "POST",
        "/logs/filter",
        {"logs": {"flow_run_id": {"any_": [finished.id]}}, "sort": "TIMESTAMP_ASC", "limit": 200},
    )
    expected = [_norm(entry["message"]) for entry in logs]
    assert len(expected) >= 10 and any("Finished in state Completed" in m for m in expected), expected
    b.click(b.wait_for_xpath("//button[@role='tab' and normalize-space()='Logs']"))
    b.wait_for_css("[role='log'] li")
    seen: set[str] = set()
    missing: list[str] = expected

    def all_shown() -> bool:
        nonlocal missing
        rendered = b.js(
            """
            const log = document.querySelector("[role='log']");
            if (!log) return null;
            const items = Array.from(log.querySelectorAll('li')).map(li => li.innerText);
            const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 2;
            log.scrollTop = atEnd ? 0 : log.scrollTop + log.clientHeight * 0.6;  // go round again if needed
            return items;
            """
        )
        seen.update(_norm(text) for text in rendered or [])
        missing = [m for m in missing if not any(m in text for text in seen)]
        return not missing

    timed_out = None
    try:
        b.wait_until(all_shown, f"{len(expected)} log lines on the Logs tab", timeout=60)
    except BrowserTimeout as exc:
        timed_out = exc
    if timed_out is not None:
        pytest.fail(f"{timed_out}\nnot shown: {missing}")
    # For the screenshot: the log panel at the top of the window, scrolled to the run's last lines.
    b.js(
        "const log = document.querySelector(\"[role='log']\"); log.scrollIntoView(); log.scrollTop = log.scrollHeight"
    )
    b.wait_for_css("[role='log'] li", text="Finished in state Completed")
    b.screenshot(ui.shots / "run_logs.png")


def _artifact_cards(ui: Ui, run_id: str, text: str, count: int) -> list[str]:
    """The run's Artifacts tab: the links of the cards whose text contains text (waits for count of them)."""
    b = ui.browser
    if f"/runs/flow-run/{run_id}" not in b.url:
        b.open(f"{ui.v2}/runs/flow-run/{run_id}")
    b.click(b.wait_for_xpath("//button[@role='tab' and normalize-space()='Artifacts']"))
    selector = "a[href*='/artifacts/artifact/']"
    cards = b.wait_until(
        lambda: (
            (found := [a for a in b.find_all(selector) if text in a.text]) and len(found) >= count and found
        ),
        f"{count} artifact card(s) with {text!r}",
    )
    assert len(cards) == count, [a.text for a in cards]
    return [a.get_attribute("href") for a in cards]


def test_session_summary_table_has_one_row_per_scan(ui: Ui, finished: SubmittedRun) -> None:
    b = ui.browser
    scans = sorted(p.name for p in (ui.stack.output_dir / "sessions" / finished.id / "scans").glob("*.h5"))
    assert len(scans) == TINY["n_scans"], scans
    (href,) = _artifact_cards(ui, finished.id, "session-summary", 1)
    b.click(b.wait_for_css(f"a[href$='/artifacts/artifact/{href.rsplit('/', 1)[1]}']"))
    b.wait_until(lambda: "/artifacts/artifact/" in b.url, "the artifact's page")
    b.wait_for_css("table tbody tr", text=scans[-1])

    def table() -> tuple[list[str], list[list[str]]] | None:
        """The table's headers and rows, or None while the page re-renders it (stale elements)."""
        try:
            headers = [_norm(th.text) for th in b.find_all("table thead th")]
            rows = [
                [_norm(td.text) for td in tr.find_elements("css selector", "td")]
                for tr in b.find_all("table tbody tr")
            ]
        except StaleElementReferenceException:
            return None
        return headers, rows

    headers, rows = b.wait_until(table, "the summary table, read whole")
    assert "scan" in headers and "file" in headers, headers
    assert len(rows) == TINY["n_scans"], rows
    files = [row[headers.index("file")] for row in rows]
    assert sorted(files) == scans, (files, scans)
    assert sorted(row[headers.index("scan")] for row in rows) == [
        str(n) for n in range(1, TINY["n_scans"] + 1)
    ]
    b.screenshot(ui.shots / "session_summary.png")


def _images_loaded(b: Browser, count: int) -> list | None:
    """[alt, naturalWidth, naturalHeight] of the page's data: images once there are count of them, all
    done loading (decoded or broken); None before."""
    images = b.js(
        """
        const imgs = Array.from(document.querySelectorAll('img[src^="data:image/"]'));
        if (!imgs.length || !imgs.every(img => img.complete)) return null;
        return imgs.map(img => [img.alt, img.naturalWidth, img.naturalHeight]);
        """
    )
    return images if images and len(images) >= count else None


def test_analysis_artifacts_show_their_images_loaded(ui: Ui, finished: SubmittedRun) -> None:
    b = ui.browser
    artifacts = ui.api(
        "POST",
        "/artifacts/filter",
        {"artifacts": {"flow_run_id": {"any_": [finished.id]}, "type": {"any_": ["markdown"]}}},
    )
    analyses = {  # the analyses' artifacts (the session also links its live page in one: session-live-view)
        a["id"]: (a["key"], json.dumps(a["data"]).count("data:image/"))
        for a in artifacts
        if a["key"].startswith("analysis-")
    }
    assert any(a["key"] == "session-live-view" for a in artifacts), [a["key"] for a in artifacts]
    assert len(analyses) == TINY["n_scans"] and all(n for _, n in analyses.values()), analyses
    hrefs = _artifact_cards(ui, finished.id, "analysis-", TINY["n_scans"])
    assert sorted(href.rsplit("/", 1)[1] for href in hrefs) == sorted(analyses)
    for i, href in enumerate(hrefs):
        key, n_images = analyses[href.rsplit("/", 1)[1]]
        b.open(href)
        b.wait_for_text(key)

        images = b.wait_until(partial(_images_loaded, b, n_images), f"{n_images} images of {key}, loaded")
        assert len(images) == n_images, images
        broken = [alt for alt, width, height in images if width <= 0 or height <= 0]
        assert not broken, f"{key}: images not decoded (naturalWidth 0): {broken}"
        if i == 0:
            b.screenshot(ui.shots / "analysis.png", full_page=True)
