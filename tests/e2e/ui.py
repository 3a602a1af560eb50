"""A headless Chromium page on the live stack's UI, for tests outside test_live_airflow_ui.py (the same Debian
chromium and Playwright setup; None when chromium is not installed)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import REPO

CHROMIUM = os.environ.get("CTR_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def have_chromium() -> bool:
    return Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is not None


@contextmanager
def chromium_page() -> Iterator[Any]:
    """A headless Chromium page with a fresh profile (removed afterwards); the caller checks have_chromium()."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        with sync_playwright() as p:
            # a persistent context is how a fresh --user-data-dir is given to a Playwright-launched Chromium
            ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                       args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
            try:
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                page.set_default_timeout(60_000)
                yield page
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@contextmanager
def signed_in_page(stack: Any, user: str, password: str) -> Iterator[Any]:
    """A page signed in to the stack's UI as `user`, or None without chromium (`make system-deps`)."""
    if not have_chromium():
        yield None
        return
    with chromium_page() as page:
        page.goto(f"{stack.url}/")
        page.wait_for_url("**/auth/login**")
        page.locator("input[name=username]").fill(user)
        page.locator("input[name=password]").fill(password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda url: "/auth/login" not in url)  # signed in: the UI has left the form
        yield page


def required_actions_screenshot(stack: Any, user: str, password: str, expect_text: str) -> Path | None:
    """Open Browse → Required Actions, wait until `expect_text` (the pending request's subject) shows, keep a
    screenshot under test-artifacts/; None without chromium."""
    with signed_in_page(stack, user, password) as page:
        if page is None:
            return None
        ARTIFACTS.mkdir(exist_ok=True)
        out = ARTIFACTS / "airflow-ui-required-actions.png"
        page.wait_for_load_state("networkidle")
        page.goto(f"{stack.url}/required_actions", wait_until="domcontentloaded")
        try:
            page.get_by_text(expect_text).first.wait_for()
        finally:
            page.screenshot(path=str(out), full_page=True)
        return out
