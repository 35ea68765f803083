"""How fast the console's pages load with a big store, measured in the browser (Debian's chromium,
headless, through Selenium): 10,000 keys and 1,000,000 ledger rows over the last 90 days.

    python deploy/loadtest/console.py                      # seeds a SQLite store, prints each page's time
    python deploy/loadtest/console.py --screenshots docs/console

A page's time runs from the navigation's start to the moment its script has rendered the admin
API's answers (`performance.now()` then): the HTML, the script, every API call and the drawing.
Needs chromium and chromium-driver (Debian) and selenium (pip install -e '.[test]').
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

from run import free_port, wait_port  # noqa: E402

TOKEN = "console-speed-" + os.urandom(8).hex()
MODELS = ["anthropic/claude-sonnet-4.6", "anthropic/claude-haiku-4.5", "openai/gpt-5.4", "openai/gpt-5.4-mini",
          "google/gemini-3-flash-preview", "minimax/minimax-m2.5:free", "deepseek/deepseek-v3.2", "x-ai/grok-4.1-fast"]


def seed(path: str, keys: int, rows: int, days: int) -> None:
    """Accounts and ledger rows straight into the store's tables (made by the gateway's own code)."""
    from proxy.keys import hash_key
    from proxy.store.sqlite import connect

    db = connect(path)  # the schema, migrated
    rng = random.Random(7)
    now = time.time()
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO accounts (name, key_hash, key_hint, balance_micros, created_at, settings) VALUES (?, ?, ?, ?, ?, ?)",
        [(f"team-{i % 97}-bot-{i}", hash_key(f"seed-{i}"), f"tsk_…{i:04d}"[-8:], rng.randrange(0, 50_000_000),
          now - days * 86400, '{"rpm": 600, "budgets": ["20/day"], "tags": {"team": "t%d"}}' % (i % 97) if i % 10 == 0 else "{}")
         for i in range(keys)])
    db.executemany("INSERT INTO key_tags (account_id, tag) VALUES (?, ?)",
                   [(i + 1, f"team=t{i % 97}") for i in range(0, keys, 10)])
    batch = []
    for n in range(rows):
        created = now - rng.random() ** 1.3 * days * 86400  # more of them recently
        prompt, completion = rng.randrange(50, 4000), rng.randrange(10, 1500)
        duration = rng.lognormvariate(7, 0.6)
        batch.append((f"seed{n:08d}", rng.randrange(1, keys + 1), None, MODELS[n % 8], MODELS[n % 8], "openrouter", prompt,
                      completion, 0, 0, 0, 0 if MODELS[n % 8].endswith(":free") else (prompt * 3 + completion * 15) // 10, 0,
                      200 if rng.random() > 0.02 else 502, duration * 0.3, duration, "stop", n % 3 == 0, created))
        if len(batch) == 50_000:
            db.executemany("INSERT INTO ledger VALUES (" + ", ".join("?" * 19) + ")", batch)
            batch.clear()
    if batch:
        db.executemany("INSERT INTO ledger VALUES (" + ", ".join("?" * 19) + ")", batch)
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def measure(base: str, runs: int, shots: Path | None, traffic) -> dict[str, list[float]]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    times: dict[str, list[float]] = {}
    try:
        driver.get(base + "/admin/")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ready"))
        for page in ("overview", "keys", "usage", "live"):
            for _ in range(runs):
                driver.get("about:blank")
                driver.get(f"{base}/admin/#{page}")
                WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ready") == page)
                times.setdefault(page, []).append(driver.execute_script("return window.turnstileReady"))
            if shots is not None:
                if page == "live":
                    traffic()
                    time.sleep(1.0)
                driver.save_screenshot(str(shots / f"{page}.png"))
    finally:
        driver.quit()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--screenshots", type=Path, help="save each page's screenshot here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="turnstile-console-"))
    store = str(tmp / "keys.db")
    started = time.monotonic()
    seed(store, args.keys, args.rows, args.days)
    print(f"seeded {args.keys:,} keys and {args.rows:,} ledger rows in {time.monotonic() - started:.0f} s")
    mock, port = free_port(), free_port()
    env = {**os.environ, "OPENROUTER_API_KEY": "sk-bench", "OPENROUTER_BASE_URL": f"http://127.0.0.1:{mock}/v1",
           "TURNSTILE_ADMIN_TOKEN": TOKEN, "TURNSTILE_STORE_URL": store}
    upstream = subprocess.Popen([sys.executable, str(HERE / "mock_upstream.py"), "--port", str(mock), "--chunks", "5"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gateway = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--port", str(port)], env=env, cwd=tmp,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def traffic() -> None:
        """A few requests with a key made for the purpose, for the Live page's picture."""
        from proxy.store import create_key

        key = create_key(store, "live-demo", "5")

        async def go() -> None:
            import aiohttp

            async with aiohttp.ClientSession() as session:
                for model in MODELS[:6]:
                    body = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
                    async with session.post(base + "/v1/chat/completions", json=body,
                                            headers={"Authorization": f"Bearer {key}"}) as resp:
                        await resp.read()

        asyncio.run(go())

    try:
        wait_port(mock)
        wait_port(port)
        if args.screenshots:
            args.screenshots.mkdir(parents=True, exist_ok=True)
        times = measure(base, args.runs, args.screenshots, traffic)
    finally:
        gateway.terminate()
        upstream.terminate()
        gateway.wait()
        upstream.wait()
    print(f"page load in the browser, {args.runs} runs each (ms): median, worst")
    for page, values in times.items():
        print(f"  {page:<9} {statistics.median(values):7.0f} {max(values):7.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
