"""A headless Chromium for tests of the console's page (tests/integration/test_console_browser.py).

Debian's chromium, driven by its chromedriver through selenium (the test extra).
Chromium is a tree of processes, and not all of them stay in chromedriver's
session: its crash handlers double-fork into sessions of their own. So every
process is accounted for twice over: chromedriver starts a session of its own
(its process group holds the browser), and HOME and the XDG directories point
into the instance's temporary directory, which therefore appears in the command
line of every process it starts, crash handlers included. stop() asks politely
(WebDriver quit), then kills what is left of exactly those processes, by PID.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import psutil

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _import_selenium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common import utils

    class LoopbackService(Service):
        # Selenium reaches chromedriver by the name localhost; the tests talk to 127.0.0.1 only.
        @property
        def service_url(self) -> str:
            return f"http://127.0.0.1:{self.port}"

        def is_connectable(self) -> bool:
            return utils.is_connectable(self.port, "127.0.0.1")

    return webdriver, LoopbackService


def missing() -> str | None:
    """Why no browser test can run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (Debian package {package})"
    try:
        _import_selenium()
    except ImportError:
        return "selenium is missing (pip install -e '.[test]')"
    return None


class Chromium:
    """One headless browser. start() and stop() are safe twice; also a context manager."""

    def __init__(self, width: int = 1280, height: int = 1800, quit_wait: float = 10.0):
        self.size = (width, height)
        self.quit_wait = quit_wait
        self.driver = None
        self.root: Path | None = None
        self._service = None
        self._group: int | None = None
        # pid -> create_time of every process seen as ours; the time tells a pid reused later apart.
        self._seen: dict[int, float] = {}

    def __enter__(self) -> "Chromium":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- lifetime -----------------------------------------------------------
    def start(self) -> "Chromium":
        if self.driver is not None:
            return self
        why = missing()
        if why:
            raise RuntimeError(f"no browser for the console's tests: {why}")
        webdriver, Service = _import_selenium()
        self.root = Path(tempfile.mkdtemp(prefix="sfmpi-chromium-"))
        env = {**os.environ, "HOME": str(self.root), "XDG_CONFIG_HOME": str(self.root / "config"),
               "XDG_CACHE_HOME": str(self.root / "cache"), "XDG_DATA_HOME": str(self.root / "data")}
        for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            env.pop(proxy, None)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        options.ignore_local_proxy_environment_variables()
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # for console_errors()
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--user-data-dir={self.root / 'profile'}", f"--window-size={self.size[0]},{self.size[1]}",
                    # Nothing but the page under test: no proxy, no update or sync traffic, and no name
                    # resolves but 127.0.0.1, so a stray fetch fails instead of leaving the host.
                    "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--no-first-run",
                    "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-default-apps", "--disable-extensions", "--no-pings",
                    "--disable-crash-reporter", "--disable-breakpad"):
            options.add_argument(arg)
        self._service = Service(CHROMEDRIVER, env=env, log_path=str(self.root / "chromedriver.log"),
                                popen_kw={"start_new_session": True})
        try:
            self.driver = webdriver.Chrome(service=self._service, options=options)
            self.track()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        driver, self.driver = self.driver, None
        self.track()
        if driver is not None:
            try:
                driver.quit()  # also stops chromedriver
            except Exception:
                pass
        elif self._service is not None and getattr(self._service, "process", None) is not None:
            try:
                self._service.stop()  # chromedriver started but the session never came
            except Exception:
                pass
        self._service = None
        self._reap()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def track(self) -> None:
        """Note every process that is ours now (called at start and stop; call it
        after anything that may start more, such as opening a page)."""
        process = getattr(self._service, "process", None)
        if process is not None:
            self._group = process.pid  # a new session: its group id is chromedriver's pid
        for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
            try:
                in_group = self._group is not None and os.getpgid(p.pid) == self._group
            except OSError:
                continue
            mine = self.root is not None and any(str(self.root) in arg for arg in p.info["cmdline"] or ())
            if in_group or mine:
                self._seen[p.pid] = p.info["create_time"]

    def leftovers(self) -> list[int]:
        """Processes of this browser that still run (after stop(): none)."""
        alive = []
        for pid, created in self._seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        return alive

    def _reap(self) -> None:
        """After quit: give the browser a moment to exit by itself, then kill what
        remains: its process group, and each process noted as ours."""
        self.track()
        deadline = time.monotonic() + self.quit_wait
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._group is not None:
            try:
                os.killpg(self._group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # the group is empty: all of it exited
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.1)

    # -- the page ------------------------------------------------------------
    def open(self, url: str) -> None:
        self.driver.get(url)
        self.track()

    def js(self, expression: str, *args):
        """The value of a JavaScript expression in the page."""
        return self.driver.execute_script(f"return ({expression});", *args)

    def wait_js(self, expression: str, timeout: float = 20.0, *args):
        """Wait until a JavaScript expression is truthy in the page; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {timeout:g} s in the page: {expression} (last: {value!r})")
            time.sleep(0.2)

    def text(self, element_id: str) -> str | None:
        return self.js("document.getElementById(arguments[0]) ? "
                       "document.getElementById(arguments[0]).textContent : null", element_id)

    def console_errors(self) -> list[str]:
        """The page's severe console messages (a script error, a blocked fetch)."""
        return [e["message"] for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def screenshot(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.driver.save_screenshot(str(path)):
            raise AssertionError(f"chromium could not save a screenshot to {path}")
        return path
