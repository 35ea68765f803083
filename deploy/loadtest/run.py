"""One command: starts a mock provider, the bare relay and Turnstile, measures each, stops them.

Every scenario runs against direct / bare relay / Turnstile (full default pipeline) in turn, and the
results print as four tables.

    python deploy/loadtest/run.py            # about four minutes
    python deploy/loadtest/run.py --smoke    # under a minute, as CI runs it: 1 s per wrk run, 200/s
                                             # only, 100 slow streams instead of 1,000

Needs wrk (Debian: apt-get install wrk). Every target is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import loadgen  # noqa: E402

CHAT = json.dumps({"model": "openai/gpt-5.4", "messages": [{"role": "user", "content": "Say hello"}]}).encode()
STREAM = json.dumps({"model": "openai/gpt-5.4", "stream": True, "messages": [{"role": "user", "content": "Say hello"}]}).encode()


# The providers' keys the mock is sent, as long as real ones: the gateway searches every answer for
# the key its provider was sent (redaction), and a short key is slower to search for than a real one.
_HEX = "5d41402abc4b2a76b9719d911017c592" * 2
PROVIDER_KEYS = {"OPENROUTER_API_KEY": "sk-or-v1-" + _HEX, "ANTHROPIC_API_KEY": "sk-ant-api03-" + _HEX + _HEX[:31] + "AA",
                 "GEMINI_API_KEY": "AIzaSy" + _HEX[:33]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


class Proc:
    """A server process and its CPU time and memory, children included (workers)."""

    def __init__(self, stack: ExitStack, args: list[str], env: dict[str, str] | None = None) -> None:
        self.p = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(self.stop)

    def pids(self) -> list[int]:
        """The server and its workers: read from /proc, or asked of pgrep where the kernel does not
        list children there."""
        try:
            kids = Path(f"/proc/{self.p.pid}/task/{self.p.pid}/children").read_text().split()
        except OSError:
            kids = subprocess.run(["pgrep", "-P", str(self.p.pid)], capture_output=True, text=True).stdout.split()
        return [self.p.pid, *map(int, kids)]

    def cpu(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (FileNotFoundError, IndexError):
                pass
        return total / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except FileNotFoundError:
                pass
        return total / 1024

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()


def wrk(url: str, script: str, seconds: float, connections: int, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(HERE / script), url],
                         capture_output=True, text=True, env={**os.environ, **env}, timeout=seconds + 60).stdout
    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(rps.group(1)) if rps else 0.0, "requests": int(total.group(1)) if total else 0,
            "p50": ms("50"), "p90": ms("90"), "p99": ms("99"), "non2xx": int(non2xx.group(1)) if non2xx else 0}


def measure(proc: Proc | None, fn):
    """Runs `fn` (a coroutine function) while a thread samples the server's memory: the sampling is
    not done in the load generator's event loop, which times every chunk, and its own cycle
    collector is off meanwhile."""
    before = proc.cpu() if proc else 0.0
    peak = [proc.rss_mb() if proc else 0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], proc.rss_mb())  # type: ignore[union-attr]

    sampler = threading.Thread(target=sample, daemon=True)
    if proc:
        sampler.start()
    gc.disable()  # the load generator's own collections would show as the server's stalls and latency
    try:
        result = asyncio.run(fn())
    finally:
        gc.enable()
        stop.set()
        if proc:
            sampler.join()
    return result, (proc.cpu() - before if proc else 0.0), peak[0]


def _cpus(part: str) -> range:
    low, _, high = part.partition("-")
    return range(int(low), int(high or low) + 1)


def fmt(v: float, digits: int = 2) -> str:
    return "-" if v != v else f"{v:,.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few seconds per scenario, to keep the kit working")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="Turnstile worker processes")
    ap.add_argument("--cpus", default="", metavar="SERVERS:LOAD",
                    help="pin the relay and Turnstile (its workers) to the CPUs SERVERS and everything else (wrk, the "
                    "mock, the Python load generator) to LOAD, as taskset lists them: --cpus 0:1, --cpus 0-1:2-3")
    args = ap.parse_args()
    pin: list[str] = []
    if args.cpus:
        servers, _, load = args.cpus.partition(":")
        if not servers or not load or shutil.which("taskset") is None:
            ap.error("--cpus takes SERVERS:LOAD CPU lists, and needs taskset (util-linux)")
        pin = ["taskset", "-c", servers]
        os.sched_setaffinity(0, {cpu for part in load.split(",") for cpu in _cpus(part)})  # inherited by wrk and the mock
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    seconds = 1.0 if args.smoke else args.seconds
    rates = [(200, 2.0)] if args.smoke else [(200, 10.0), (1000, 10.0)]
    slow_streams = 100 if args.smoke else 1000
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="turnstile-bench-"))
    mock, bare, gw = free_port(), free_port(), free_port()

    from proxy.store import create_key

    key = create_key(str(tmp / "keys.db"), "bench", "1000000")
    config = tmp / "turnstile.toml"
    # The full default pipeline with its default limits; the anonymous scenario spreads its requests
    # over many client addresses (X-Forwarded-For, believed from 127.0.0.1 only).
    config.write_text(f"""[server]
port = {gw}
workers = {args.workers}
trusted_proxies = ["127.0.0.1/32"]
[keys]
db = "{tmp / 'keys.db'}"
[logging]
format = "json"
[limits]
storage = "{'memory://' if args.workers == 1 else os.environ.get('BENCH_REDIS', 'redis://127.0.0.1:6379')}"
""")
    env = {**PROVIDER_KEYS, "OPENROUTER_BASE_URL": f"http://127.0.0.1:{mock}/v1",
           "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{mock}", "GEMINI_BASE_URL": f"http://127.0.0.1:{mock}/v1beta"}
    rows: list[list[str]] = []
    with ExitStack() as stack:
        Proc(stack, [py, str(HERE / "mock_upstream.py"), "--port", str(mock), "--chunks", "50"])
        targets = {"direct": None}
        targets["bare"] = Proc(stack, [*pin, py, str(HERE / "bare_relay.py"), "--port", str(bare), "--upstream", f"http://127.0.0.1:{mock}"])
        targets["turnstile"] = Proc(stack, [*pin, py, "-m", "proxy", "serve", "--config", str(config)], env)
        urls = {"direct": f"http://127.0.0.1:{mock}", "bare": f"http://127.0.0.1:{bare}", "turnstile": f"http://127.0.0.1:{gw}"}
        for port in (mock, bare, gw):
            wait_port(port)
        time.sleep(0.5)
        idle = targets["turnstile"].rss_mb()
        results: dict[tuple[str, str], dict[str, float]] = {}
        for scenario, script in (("chat", "chat.lua"), ("stream", "stream.lua"), ("anonymous", "anonymous.lua"), ("mix", "mix.lua")):
            for name, proc in targets.items():
                wrk(urls[name] + "/v1/chat/completions", script, min(seconds, 1.0), args.connections, {"KEY": key})  # warm-up
                r, cpu, peak = measure(proc, lambda: asyncio.to_thread(
                    wrk, urls[name] + "/v1/chat/completions", script, seconds, args.connections, {"KEY": key}))
                r["cpu_ms"] = cpu * 1000 / r["requests"] if r["requests"] and proc else float("nan")
                r["rss"] = peak
                results[(scenario, name)] = r
        header = ["scenario", "target", "req/s", "x bare", "p50 ms", "p90 ms", "p99 ms", "+p50 vs direct", "CPU ms/req", "x bare", "peak RSS MB", "non-2xx"]
        for (scenario, name), r in results.items():
            base, direct = results[(scenario, "bare")], results[(scenario, "direct")]
            rows.append([scenario, name, fmt(r["rps"], 0), fmt(r["rps"] / base["rps"]) if base["rps"] else "-",
                         fmt(r["p50"]), fmt(r["p90"]), fmt(r["p99"]), fmt(r["p50"] - direct["p50"]),
                         fmt(r["cpu_ms"], 3), fmt(r["cpu_ms"] / base["cpu_ms"]) if name == "turnstile" else "-",
                         fmt(r["rss"], 0) if name != "direct" else "-", str(int(r["non2xx"]))])
        print(f"\nwrk -t2 -c{args.connections}, {seconds:g} s per run, mock stream of 50 chunks; Turnstile: "
              f"{args.workers} worker(s), default pipeline (auth, automodel, freegate, ratelimit 200/hour per IP); "
              f"{'servers on CPUs ' + pin[2] + ', load on ' + args.cpus.partition(':')[2] + '; ' if pin else ''}"
              f"idle RSS {idle:.0f} MB\n")
        table(header, rows)

        print("\nFixed rate (open loop, Python client), non-stream chat; latency in ms\n")
        fixed: list[list[str]] = []
        for rate, secs in rates:
            got = {}
            for name in targets:
                r, cpu, _ = measure(targets[name], lambda: loadgen.fixed_rate(
                    urls[name] + "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}, rate, secs))
                got[name] = r
            for name, r in got.items():
                d = got["direct"]
                fixed.append([f"{rate}/s", name, fmt(r.pct(r.latencies, 50)), fmt(r.pct(r.latencies, 99)),
                              fmt(r.pct(r.latencies, 50) - d.pct(d.latencies, 50)), fmt(r.pct(r.latencies, 99) - d.pct(d.latencies, 99)),
                              str(r.errors)])
        table(["rate", "target", "p50", "p99", "+p50 vs direct", "+p99 vs direct", "errors"], fixed)

        print("\nStreams, 50 chunks, no delay: 32 at a time (streams/s; the time to first byte includes the\n"
              f"queue), then 200/s on schedule ({rates[0][1]:g} s; the time to first byte a stream adds); in ms\n")
        ttfb: list[list[str]] = []
        got, paced = {}, {}
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        for name in targets:
            got[name], _, _ = measure(targets[name], lambda: loadgen.concurrent(
                urls[name] + "/v1/chat/completions", STREAM, headers, 32, 320 if args.smoke else 3200))
            paced[name], _, _ = measure(targets[name], lambda: loadgen.fixed_rate(
                urls[name] + "/v1/chat/completions", STREAM, headers, 200, rates[0][1]))
        for name, r in got.items():
            d, p, pd = got["direct"], paced[name], paced["direct"]
            ttfb.append([name, fmt(len(r.latencies) / r.elapsed, 0), fmt(r.pct(r.ttfb, 50)), fmt(r.pct(r.ttfb, 50) - d.pct(d.ttfb, 50)),
                         fmt(p.pct(p.ttfb, 50)), fmt(p.pct(p.ttfb, 50) - pd.pct(pd.ttfb, 50)),
                         fmt(p.pct(p.ttfb, 99) - pd.pct(pd.ttfb, 99)), str(r.errors + p.errors)])
        table(["target", "streams/s", "TTFB p50", "+TTFB vs direct", "TTFB p50 at 200/s", "+p50 vs direct",
               "+p99 vs direct", "errors"], ttfb)

        print(f"\n{slow_streams} concurrent slow streams (50 chunks, 20 ms apart)\n")
        slow_body = json.dumps({"model": "openai/gpt-5.4", "stream": True, "mock_delay": 0.02,
                                "messages": [{"role": "user", "content": "hi"}]}).encode()
        # Direct too: the load generator (one Python process reading 50,000 chunks a second) and the
        # mock have stalls of their own, which every row includes.
        slow: list[list[str]] = []
        stall: dict[str, float] = {}
        for name in targets:
            r, _, peak = measure(targets[name], lambda: loadgen.concurrent(
                urls[name] + "/v1/chat/completions", slow_body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                slow_streams))
            stall[name] = r.max_gap * 1000 - 20
            slow.append([name, f"{len(r.latencies)}/{slow_streams}", fmt(stall[name], 0), fmt(stall[name] - stall["direct"], 0),
                         fmt(peak, 0) if targets[name] else "-", str(r.errors)])
        table(["target", "completed", "worst stall beyond pace ms", "+ vs direct", "peak RSS MB", "errors"], slow)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
