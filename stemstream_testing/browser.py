"""Headless Chromium for page tests: Debian's ``chromium`` driven through its ``chromedriver`` (Selenium).

    with headless_chromium(tmp_path / "browser") as browser:
        browser.open("http://127.0.0.1:4200/")
        heading = browser.wait_for_css("h1", timeout=30)
        browser.wait_for_text("Flow runs", timeout=30)
        browser.screenshot(tmp_path / "home.png")

The browser is the system's (``scripts/install-test-deps.sh`` installs the ``chromium`` and
``chromium-driver`` packages); nothing is ever downloaded: Selenium Manager is skipped because the driver's
path is given. Chromium runs with a new, empty profile in the work directory and the flags that keep it off
the (closed) network: no background networking, component updates, sync or QUIC.

Pages that animate (transitions, lazy loading, live data) are waited on, never slept on: every ``wait_*``
polls a condition until a bounded timeout and then raises :class:`BrowserTimeout` naming what it waited
for, with the page's URL, the start of its visible text and, when the browser was given a work directory,
a screenshot of the page as it was.

Leaving the ``with`` block always quits the browser and stops chromedriver; whatever the two left behind
(they carry a marker in their environment, which Chromium's own children inherit) is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Known to work on these machines (as root, in a container, with no network beyond package registries).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a small /dev/shm
    "--hide-scrollbars",
    "--mute-audio",
)

MARKER = "STEMSTREAM_BROWSER_MARKER"  # in the environment of chromedriver, Chromium and its children

T = TypeVar("T")


class BrowserTimeout(AssertionError):
    """A bounded wait ran out; the message says what for and how the page looked."""


class Browser:
    """A started headless Chromium: navigation, bounded waits, JavaScript and screenshots.

    ``driver`` is the Selenium WebDriver, for anything this class does not wrap.
    """

    def __init__(self, driver: webdriver.Chrome, work_dir: Path | None = None, timeout: float = 30.0):
        self.driver = driver
        self.work_dir = work_dir
        self.timeout = timeout  # the default bound of every wait
        self._failures = 0

    # -- navigation and page access -------------------------------------------------------------

    def open(self, url: str) -> None:
        """Load url (returns once the document has loaded; wait for what the page renders after that)."""
        self.driver.get(url)

    @property
    def url(self) -> str:
        return self.driver.current_url

    def js(self, script: str, *args: Any) -> Any:
        """Run script in the page (``return ...`` gives a value; args are ``arguments[0]``, ...)."""
        return self.driver.execute_script(script, *args)

    def text(self, css: str = "body") -> str:
        """The visible text of the first element matching css ("" if none)."""
        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        try:
            return found[0].text if found else ""
        except StaleElementReferenceException:
            return ""

    def find_all(self, css: str) -> list[WebElement]:
        """Every element matching css now (no wait)."""
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def screenshot(self, path: Path | str, full_page: bool = False) -> Path:
        """A PNG of the viewport (or, full_page, of the whole document height) at path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if full_page:
            size = self.driver.get_window_size()
            height = int(self.js("return Math.max(document.body.scrollHeight, window.innerHeight)") or 0)
            self.driver.set_window_size(size["width"], min(max(height + 150, size["height"]), 8000))
            try:
                self.driver.save_screenshot(str(path))
            finally:
                self.driver.set_window_size(size["width"], size["height"])
        else:
            self.driver.save_screenshot(str(path))
        return path

    def console_errors(self) -> list[str]:
        """Messages the page logged at SEVERE level since the last call (JavaScript errors, failed loads)."""
        with contextlib.suppress(WebDriverException):
            return [e["message"] for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]
        return []

    # -- bounded waits --------------------------------------------------------------------------

    def wait_until(
        self, condition: Callable[[], T], what: str, timeout: float | None = None, interval: float = 0.2
    ) -> T:
        """Poll condition() until it returns something truthy, and return that; raise BrowserTimeout after
        timeout seconds. Elements replaced while the page re-renders count as "not yet"."""
        bound = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + bound
        last_error: Exception | None = None
        while True:
            try:
                value = condition()
                if value:
                    return value
            except (StaleElementReferenceException, LookupError) as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise BrowserTimeout(
                    self._describe(f"timed out after {bound:.0f} s waiting for {what}", last_error)
                )
            time.sleep(interval)

    def wait_for_css(
        self, css: str, timeout: float | None = None, visible: bool = True, text: str | None = None
    ) -> WebElement:
        """The first element matching css that is displayed (visible=False: merely present) and, if text is
        given, contains it."""

        def found() -> WebElement | None:
            for element in self.driver.find_elements(By.CSS_SELECTOR, css):
                if visible and not element.is_displayed():
                    continue
                if text is not None and text not in element.text:
                    continue
                return element
            return None

        what = (
            f"{css!r}"
            + (f" containing {text!r}" if text is not None else "")
            + (" displayed" if visible else "")
        )
        return self.wait_until(found, what, timeout)

    def wait_for_all_css(self, css: str, count: int, timeout: float | None = None) -> list[WebElement]:
        """At least count elements matching css (present, displayed or not); returns all of them."""
        return self.wait_until(
            lambda: (
                (found := self.driver.find_elements(By.CSS_SELECTOR, css)) and len(found) >= count and found
            ),
            f"{count} x {css!r}",
            timeout,
        )

    def wait_for_text(self, text: str, timeout: float | None = None, css: str = "body") -> WebElement:
        """The first element matching css (the whole page by default) whose visible text contains text."""
        return self.wait_for_css(css, timeout, visible=True, text=text)

    def wait_for_xpath(self, xpath: str, timeout: float | None = None, visible: bool = True) -> WebElement:
        """The first element matching xpath that is displayed (visible=False: merely present)."""

        def found() -> WebElement | None:
            for element in self.driver.find_elements(By.XPATH, xpath):
                if not visible or element.is_displayed():
                    return element
            return None

        return self.wait_until(found, f"xpath {xpath!r}", timeout)

    def click(self, element: WebElement) -> None:
        """Click element once it is in view; a click another element would take (an overlay that is still
        fading out) is retried until the wait's bound."""
        self.js("arguments[0].scrollIntoView({block: 'center'})", element)

        def clicked() -> bool:
            try:
                element.click()
            except WebDriverException as exc:
                if "not clickable" in str(exc) or "not interactable" in str(exc):
                    return False
                raise
            return True

        self.wait_until(clicked, f"a click on <{element.tag_name}> {element.text[:60]!r}")

    def _describe(self, message: str, error: Exception | None) -> str:
        lines = [message]
        with contextlib.suppress(WebDriverException):
            lines.append(f"page: {self.driver.current_url}")
            body = " ".join(self.text().split())
            lines.append(f"page text: {body[:1500]!r}")
        if error is not None:
            lines.append(f"last error: {type(error).__name__}: {str(error)[:300]}")
        if self.work_dir is not None:
            self._failures += 1
            shot = self.work_dir / f"timeout-{self._failures}.png"
            with contextlib.suppress(WebDriverException, OSError):
                self.driver.save_screenshot(str(shot))
                lines.append(f"screenshot: {shot}")
        return "\n".join(lines)


def _marked_pids(marker: str) -> list[int]:
    """Live processes (not zombies) whose environment carries this marker."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


@contextlib.contextmanager
def headless_chromium(
    work_dir: Path | str | None = None,
    *,
    width: int = 1600,
    height: int = 1000,
    timeout: float = 30.0,
    page_load_timeout: float = 60.0,
    chromium: str = CHROMIUM,
    chromedriver: str = CHROMEDRIVER,
    extra_flags: tuple[str, ...] = (),
) -> Iterator[Browser]:
    """Start headless Chromium through chromedriver; quit both (and kill what they leave) on the way out.

    work_dir holds the fresh profile, chromedriver's log and the screenshots of waits that timed out (a
    temporary directory, removed afterwards, when None). timeout is the default bound of the waits.
    """
    for exe in (chromium, chromedriver):
        if not os.access(exe, os.X_OK):
            raise FileNotFoundError(
                f"{exe} is missing: install Debian's chromium and chromium-driver (scripts/install-test-deps.sh)"
            )
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stemstream_browser_")))
        else:
            work = Path(work_dir)
            work.mkdir(parents=True, exist_ok=True)
        profile = Path(tempfile.mkdtemp(prefix="profile-", dir=work))  # new and empty, every time
        marker = uuid.uuid4().hex

        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in (
            *CHROMIUM_FLAGS,
            f"--window-size={width},{height}",
            f"--user-data-dir={profile}",
            *extra_flags,
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("SE_")
        }  # no Selenium Manager overrides
        env[MARKER] = marker
        service = Service(
            executable_path=chromedriver,
            log_output=str(work / "chromedriver.log"),
            env=env,
            popen_kw={"start_new_session": True},  # its own process group, with Chromium under it
        )
        driver = None
        try:
            driver = webdriver.Chrome(options=options, service=service)
            driver.set_page_load_timeout(page_load_timeout)
            driver.implicitly_wait(0)  # every wait is explicit and bounded
            yield Browser(driver, work, timeout)
        finally:
            if driver is not None:
                with contextlib.suppress(Exception):
                    driver.quit()  # closes Chromium, then stops chromedriver
            with contextlib.suppress(Exception):
                service.stop()
            process: subprocess.Popen | None = getattr(service, "process", None)
            if process is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
            deadline = time.monotonic() + 5
            while (left := _marked_pids(marker)) and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in left:  # ours by the marker: a browser must never outlive its test
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
