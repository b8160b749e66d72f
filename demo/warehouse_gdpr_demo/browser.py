"""A real headless Chromium, driven over the Chrome DevTools Protocol (CDP): the GDPR page's browser test
and the README's screenshot.

Why not playwright or selenium: both fetch a browser or a driver of their own (playwright's
`install`, selenium-manager) at install or test time, and pin it to their release; Debian's `chromium`
package plus this small client needs nothing but `websockets`, which Airflow's api-server already
installs (pinned in constraints.txt). The protocol calls used are few and stable: Page.navigate,
Runtime.evaluate, Input.insertText, Page.captureScreenshot.

    python -m warehouse_gdpr_demo.browser screenshot OUT.png   # after `make ui`: log in, open the page, save
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium binary: $CHROMIUM if set, else the first of CANDIDATES on PATH."""
    override = os.environ.get("CHROMIUM")
    if override:
        return override if shutil.which(override) else None
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


class BrowserError(RuntimeError):
    """The browser did not start, or a page did not do what was expected in time."""


class Chromium:
    """One headless Chromium with one page, closed by `close()` (or as a context manager)."""

    def __init__(self, binary: str, width: int = 1440, height: int = 1800, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="gdpr-chromium-")
        args = [binary, "--headless", "--remote-debugging-port=0", f"--user-data-dir={self._profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
                "--disable-background-networking", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--proxy-server=direct://", "--proxy-bypass-list=*", f"--window-size={width},{height}"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox (CI containers)
        self._proc = subprocess.Popen([*args, "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._next_id = 0
        self._stack = contextlib.ExitStack()
        try:
            port = self._devtools_port()
            self._ws = self._stack.enter_context(connect(self._page_socket(port), max_size=None,
                                                         open_timeout=timeout))
        except BaseException:
            self.close()
            raise

    def _devtools_port(self) -> int:
        active = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrowserError(f"chromium exited with code {self._proc.returncode} before it listened")
            if active.exists() and active.read_text().strip():
                return int(active.read_text().splitlines()[0])
            time.sleep(0.1)
        raise BrowserError("chromium did not open its DevTools port in time")

    def _page_socket(self, port: int) -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as answer:
            targets = json.load(answer)
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise BrowserError("chromium has no page to drive")
        return str(pages[0]["webSocketDebuggerUrl"])

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One CDP command; its result (events in between are dropped)."""
        self._next_id += 1
        self._ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error'].get('message')}")
                return dict(message.get("result", {}))

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"script failed: {details.get('exception', {}).get('description') or details}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, what: str, timeout: float | None = None) -> Any:
        """Poll `expression` until it is truthy; its value. BrowserError naming `what` after the timeout."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except BrowserError:
                value = None  # the page is navigating
            if value:
                return value
            time.sleep(0.2)
        raise BrowserError(f"timed out waiting for {what}")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        time.sleep(0.2)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", f"{url} to load")

    def type_into(self, selector: str, text: str) -> None:
        """Focus the element and type, as a user's keyboard does (input events for React forms)."""
        if not self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                             " if (!e) return false; e.focus(); return true; })()"):
            raise BrowserError(f"no element {selector}")
        self.send("Input.insertText", text=text)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self._stack.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def log_in(browser: Chromium, base_url: str, username: str, password: str) -> None:
    """Airflow's login form (SimpleAuthManager), filled and sent as a person does; then the UI's home."""
    browser.navigate(f"{base_url}/")
    browser.wait_for("!!document.querySelector('input[name=username], #username')", "the login form")
    browser.type_into("input[name=username], #username", username)
    browser.type_into("input[name=password], #password", password)
    browser.evaluate("document.querySelector('button[type=submit]').click()")
    browser.wait_for("document.cookie.includes('_token=') || !location.pathname.includes('/auth/')",
                     "the login to complete")
    browser.wait_for("!location.pathname.includes('/auth/')", "the redirect after the login")


FRAME = "document.querySelector('iframe')"
FRAME_DOC = f"({FRAME} && {FRAME}.contentDocument)"


def open_gdpr_page(browser: Chromium, base_url: str) -> None:
    """The GDPR entry of the UI's navigation: Airflow's page with ours in its frame, loaded."""
    browser.navigate(f"{base_url}/plugin/gdpr")
    browser.wait_for(f"{FRAME_DOC} && {FRAME_DOC}.readyState === 'complete'"
                     f" && !!{FRAME_DOC}.querySelector('h1')", "the GDPR page in its frame", timeout=60)


def frame_text(browser: Chromium) -> str:
    return str(browser.evaluate(f"{FRAME_DOC}.body.innerText"))


def submit_request(browser: Chromium, kind: str, request_id: str, received_on: str, email: str) -> str:
    """Fill the page's form and send it; the message the page shows."""
    fields = {"kind": kind, "request_id": request_id, "received_on": received_on, "identifier": email}
    script = ";".join(f"{FRAME_DOC}.getElementById({json.dumps(k)}).value = {json.dumps(v)}"
                      for k, v in fields.items())
    browser.evaluate(f"{script}; {FRAME_DOC}.getElementById('register-submit').click(); true")
    return str(browser.wait_for(
        f"(() => {{ const r = {FRAME_DOC}.getElementById('register-result');"
        " return r && r.textContent && r.textContent !== 'Registering...' ? r.textContent : null; })()",
        "the form's answer"))


def _screenshot(out: Path) -> int:
    """After `make ui`: log in as the demo's admin, open the GDPR page, save a screenshot to `out`."""
    from .ui import read_state

    binary = find_chromium()
    if binary is None:
        print("no chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    state = read_state()
    if state is None:
        print("the demo UI is not running: run `make ui` first", file=sys.stderr)
        return 2
    with Chromium(binary) as browser:
        log_in(browser, state["url"], "admin", state["passwords"]["admin"])
        open_gdpr_page(browser, state["url"])
        time.sleep(1)
        print(browser.screenshot(out))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "screenshot":
        raise SystemExit(_screenshot(Path(sys.argv[2])))
    print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
    raise SystemExit(2)
