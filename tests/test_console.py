"""The console in a real browser (Debian's chromium, driven by Selenium): sign in, make and revoke a
key, see requests on Live and in Usage, download the CSV; a hostile key name stays text; a request
without the session, or a form posted from another site, changes nothing."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from aiohttp import web

from tests.storedb import query

TOKEN = "console-admin-token-0123456789"
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"


def _browser(downloads: Path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it")
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


@pytest.fixture
async def browser(tmp_path):
    driver = await asyncio.to_thread(_browser, tmp_path)
    try:
        yield driver
    finally:
        await asyncio.to_thread(driver.quit)


def _until(driver, condition, seconds: float = 10.0):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # A page being replaced by the next one: its elements go stale under the condition.
    return WebDriverWait(driver, seconds, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                         ).until(condition)


def _sign_in(driver, base: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(base + "/admin/")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def _open(driver, base: str, page: str) -> None:
    driver.get(f"{base}/admin/#{page}")
    _until(driver, lambda d: d.execute_script("return document.body.dataset.ready") == page)


async def test_an_operator_s_session_in_the_browser(kilo, upstream, browser, store_url, tmp_path):
    from selenium.webdriver.common.by import By

    upstream.mode, upstream.usage = "usage", {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110}
    client = await kilo(env={"TURNSTILE_ADMIN_TOKEN": TOKEN})
    base = str(client.make_url("")).rstrip("/")

    def wrong_token() -> str:
        _sign_in(browser, base, "not-the-token")
        _until(browser, lambda d: d.find_element(By.ID, "failed").is_displayed())
        return browser.get_cookie("turnstile_console") is None and "ok"

    assert await asyncio.to_thread(wrong_token) == "ok"

    def sign_in_and_create() -> str:
        _sign_in(browser, base, TOKEN)
        _until(browser, lambda d: d.execute_script("return document.body.dataset.ready") == "overview")
        cookie = browser.get_cookie("turnstile_console")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"
        _open(browser, base, "keys")
        form = browser.find_element(By.ID, "create")
        form.find_element(By.NAME, "name").send_keys(HOSTILE)
        balance = form.find_element(By.NAME, "balance")
        balance.clear()
        balance.send_keys("5")
        form.find_element(By.NAME, "rpm").send_keys("100")
        form.find_element(By.NAME, "tags").send_keys("team=console")
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        shown = _until(browser, lambda d: d.find_element(By.ID, "newkey"))
        return shown.get_attribute("value")

    key = await asyncio.to_thread(sign_in_and_create)
    assert key.startswith("tsk_")
    rows = query(store_url, "SELECT name, balance_micros FROM accounts")
    assert rows == [{"name": HOSTILE, "balance_micros": 5_000_000}]

    def listed() -> tuple[str, int, str]:
        name = browser.find_element(By.CSS_SELECTOR, "#keys tr[data-key='1'] td.name")
        images = len(browser.find_elements(By.CSS_SELECTOR, "#keys img"))
        return name.text, images, browser.title

    assert await asyncio.to_thread(listed) == (HOSTILE, 0, "Turnstile console")  # text, not markup: nothing ran

    def watch_live() -> None:
        _open(browser, base, "live")

    await asyncio.to_thread(watch_live)
    auth = {"Authorization": f"Bearer {key}"}
    chat = {"model": "anthropic/claude-sonnet-4.6", "max_tokens": 100, "messages": [{"role": "user", "content": "secret prompt"}]}
    ids = []
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", json=chat, headers=auth)
        assert resp.status == 200
        ids.append(resp.headers["X-Request-Id"])

    def seen_live() -> str:
        _until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#live tr[data-request]")) >= 3)
        return browser.find_element(By.ID, "live").text

    text = await asyncio.to_thread(seen_live)
    assert HOSTILE in text and "anthropic/claude-sonnet-4.6" in text and "secret prompt" not in text

    from proxy.app import STORE

    await client.app[STORE].flush()

    def usage_and_csv() -> tuple[int, str]:
        _open(browser, base, "usage")
        bars = len(browser.find_elements(By.CSS_SELECTOR, ".chart .hbar"))
        browser.find_element(By.ID, "csv").click()
        found = _until(browser, lambda d: [p for p in tmp_path.glob("*.csv")], 15)
        return bars, found[0].read_text()

    bars, csv = await asyncio.to_thread(usage_and_csv)
    assert bars >= 2  # the spend and token charts have the model's bar
    assert csv.splitlines()[0].startswith("model,requests") and "anthropic/claude-sonnet-4.6,3," in csv

    def revoke() -> str:
        _open(browser, base, "keys")
        browser.find_element(By.CSS_SELECTOR, "#keys tr[data-key='1'] button.revoke").click()
        browser.switch_to.alert.accept()
        _until(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#keys tr[data-key='1'] td.status").text == "revoked")
        return "revoked"

    assert await asyncio.to_thread(revoke) == "revoked"
    assert query(store_url, "SELECT revoked_at IS NOT NULL AS r FROM accounts") == [{"r": 1}]
    logs = await asyncio.to_thread(browser.get_log, "browser")
    assert not [e for e in logs if e["level"] == "SEVERE"], logs  # no CSP violation, no script error


async def test_without_the_session_or_from_another_site_nothing_changes(kilo, browser, aiohttp_server, store_url):

    from proxy.store import create_key

    client = await kilo(env={"TURNSTILE_ADMIN_TOKEN": TOKEN})
    create_key(store_url, "victim", "1")
    base = str(client.make_url("")).rstrip("/")
    # no session, no token: refused before any handler
    for method, path in (("POST", "/admin/v1/keys/1/revoke"), ("POST", "/admin/v1/keys/1/balance"),
                         ("DELETE", "/admin/v1/keys/1"), ("POST", "/admin/logout")):
        resp = await client.request(method, path, json={"add": "100"})
        assert resp.status == 401, path
    # a session's cookie without its CSRF token: refused too
    resp = await client.post("/admin/login", data={"token": TOKEN}, allow_redirects=False)
    cookie = resp.cookies["turnstile_console"].value
    resp = await client.post("/admin/v1/keys/1/revoke", headers={"Cookie": f"turnstile_console={cookie}"})
    assert resp.status == 401

    # Another site (localhost is not 127.0.0.1's site) posts forms at the signed-in console.
    target = base + "/admin/v1/keys/1"
    attack = f"""<!doctype html><body>
<form id=a method=post action="{target}/revoke" target=f1></form>
<form id=b method=post action="{target}/balance" enctype="text/plain" target=f2><input name='{{"add": "100", "x": "' value='"}}'></form>
<iframe name=f1></iframe><iframe name=f2></iframe>
<script>document.getElementById('a').submit(); document.getElementById('b').submit(); setTimeout(() => document.title = 'sent', 1500)</script>
</body>"""
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=attack, content_type="text/html")

    evil = web.Application()
    evil.router.add_get("/", page)
    server = await aiohttp_server(evil)

    def forged() -> None:
        _sign_in(browser, base, TOKEN)
        _until(browser, lambda d: d.execute_script("return document.body.dataset.ready") == "overview")
        browser.get(f"http://localhost:{server.port}/")
        _until(browser, lambda d: d.title == "sent")

    await asyncio.to_thread(forged)
    await asyncio.sleep(0.2)
    assert query(store_url, "SELECT balance_micros, revoked_at FROM accounts") == [{"balance_micros": 1_000_000,
                                                                                     "revoked_at": None}]


async def test_the_console_is_404_while_the_admin_api_is_disabled(kilo):
    client = await kilo()
    for path in ("/admin/", "/admin/static/app.js"):
        assert (await client.get(path)).status == 404
    assert (await client.post("/admin/login", data={"token": ""})).status == 404


async def test_the_session_cookie_is_secure_behind_a_trusted_tls_proxy(kilo):
    client = await kilo(env={"TURNSTILE_ADMIN_TOKEN": TOKEN})  # 127.0.0.0/8 is a trusted proxy here
    plain = await client.post("/admin/login", data={"token": TOKEN}, allow_redirects=False)
    proxied = await client.post("/admin/login", data={"token": TOKEN}, allow_redirects=False,
                                headers={"X-Forwarded-Proto": "https"})
    assert plain.status == proxied.status == 303
    assert "Secure" not in plain.headers["Set-Cookie"] and "Secure" in proxied.headers["Set-Cookie"]
    assert all(flag in proxied.headers["Set-Cookie"] for flag in ("HttpOnly", "SameSite=Strict", "Path=/admin"))


@pytest.mark.parametrize("content_type", ["multipart/form-data", "multipart/form-data; boundary=x",
                                          "application/x-www-form-urlencoded; charset=bogus"])
async def test_a_malformed_sign_in_is_a_failed_one_not_a_500(kilo, content_type):
    client = await kilo(env={"TURNSTILE_ADMIN_TOKEN": TOKEN})
    resp = await client.post("/admin/login", data=b"--x\r\ngarbage", headers={"Content-Type": content_type},
                             allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/admin/#signin-failed"
    assert "Set-Cookie" not in resp.headers


async def test_an_open_live_page_does_not_hold_a_graceful_stop(upstream, tmp_path, store_url):
    """Before: a watcher's stream kept the process for its whole grace period (62 s in a trial)."""
    import aiohttp

    from tests.processes import exit_of, free_port, start, wait_up

    port = free_port()
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[server]\nport = {port}\n[store]\nurl = "{store_url}"\n[ledger]\njournal = "{tmp_path}/ledger"\n')
    proc = await start(config, {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url,
                                "TURNSTILE_ADMIN_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        await wait_up(session, url)
        async with session.get(url + "/admin/v1/live", headers={"Authorization": f"Bearer {TOKEN}"}) as live:
            assert live.status == 200
            proc.send_signal(__import__("signal").SIGTERM)
            await asyncio.wait_for(live.read(), 20)  # the stream ends: the gateway is stopping
        code, output = await exit_of(proc, 20)  # well before the 30 s grace period runs out
    assert code == 0, output[-1500:]
