"""CPU instructions per request, counted by valgrind's callgrind, for the bare relay and Turnstile.

The same build gives the same count (within about 1%) however busy the machine is, where CPU time
moves by ±20% on a shared one.

    python deploy/loadtest/instructions.py                       # chat, 1,000 requests, 30 s to 2 min
    python deploy/loadtest/instructions.py --scenario stream --requests 500   # or anonymous, mix, anthropic, gemini, messages, responses, passthrough
    python deploy/loadtest/instructions.py --floor               # and aiohttp's server and client alone
    python deploy/loadtest/instructions.py --store postgresql://turnstile@127.0.0.1:5432/bench   # on PostgreSQL

Needs valgrind (Debian: apt-get install valgrind). The bare relay and Turnstile (full default
pipeline) each run in a process under callgrind; the mock provider and the client (8 requests at a
time) run natively beside it. Counting is switched on only for the measured requests, after a
warm-up; Turnstile's count includes the ledger's write of their rows, and of theirs only (in its
writer thread).
User-space instructions only: system calls, about the same for both here, are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from run import PROVIDER_KEYS, free_port, wait_port  # noqa: E402

BODIES = {
    "chat": '{"model":"openai/gpt-5.4","messages":[{"role":"user","content":"Say hello"}]}',
    "stream": '{"model":"openai/gpt-5.4","stream":true,"messages":[{"role":"user","content":"Say hello"}]}',
    "anonymous": '{"model":"minimax/minimax-m2.5:free","messages":[{"role":"user","content":"Say hello"}]}',
    "anthropic": '{"model":"anthropic/claude-sonnet-4.6","stream":true,"messages":[{"role":"user","content":"Say hello"}]}',
    "gemini": '{"model":"google/gemini-2.5-flash","stream":true,"messages":[{"role":"user","content":"Say hello"}]}',
    # Anthropic Messages and OpenAI Responses in, over the same chat stream as `stream`: the cost of
    # each dialect's translation.
    "messages": '{"model":"openai/gpt-5.4","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"Say hello"}]}',
    "responses": '{"model":"openai/gpt-5.4","stream":true,"input":"Say hello"}',
    # wrk's mix, request by request in turn: paid, free (with a key), an auto tier, a translated Anthropic stream.
    "mix": "\n".join((
        '{"model":"openai/gpt-5.4","messages":[{"role":"user","content":"Say hello"}]}',
        '{"model":"minimax/minimax-m2.5:free","messages":[{"role":"user","content":"Say hello"}]}',
        '{"model":"kilo-auto/balanced","messages":[{"role":"user","content":"Say hello"}]}',
        '{"model":"anthropic/claude-sonnet-4.6","stream":true,"messages":[{"role":"user","content":"Say hello"}]}')),
    # Anthropic Messages in and out (OpenRouter serves them): the passthrough of 50 Anthropic events.
    "passthrough": '{"model":"openai/gpt-5.4","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"Say hello"}]}',
}
# Where each scenario's requests go on Turnstile (the bare relay serves chat completions only).
PATHS = {"messages": "/v1/messages", "responses": "/v1/responses", "passthrough": "/v1/messages"}
# The translated scenarios have OpenRouter take chat completions only.
CHAT_ONLY = '[[providers]]\nname = "openrouter"\noptions = { dialects = [] }\n'
CONFIG = {"messages": CHAT_ONLY, "responses": CHAT_ONLY}
# The client, run natively: `n` requests, 8 at a time; anonymous ones from many client addresses.
CLIENT = """
import asyncio, os, random, sys, aiohttp
url, bodies, keyed, n = sys.argv[1], sys.argv[2].encode().split(b"\\n"), sys.argv[3] == "key", int(sys.argv[4])
key = os.environ["BENCH_KEY"] if keyed else ""
async def main():
    todo = iter(range(n))
    async with aiohttp.ClientSession() as s:
        async def worker():
            for i in todo:
                headers = {"Content-Type": "application/json"}
                if key:
                    headers["Authorization"] = "Bearer " + key
                else:
                    headers["X-Forwarded-For"] = "198.18.%d.%d" % (random.randrange(256), random.randrange(1, 255))
                async with s.post(url, data=bodies[i % len(bodies)], headers=headers) as r:
                    await r.read()
                    assert r.status == 200, r.status
        await asyncio.gather(*(worker() for _ in range(8)))
asyncio.run(main())
"""


async def _drive(port: int, scenario: str, n: int, path: str = "/v1/chat/completions") -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, f"http://127.0.0.1:{port}{path}", BODIES[scenario],
        "none" if scenario == "anonymous" else "key", str(n))
    if await proc.wait() != 0:
        raise SystemExit("the client failed")


PROFILE: "cProfile.Profile | None" = None  # --profile: Python's profiler instead of callgrind's counter


def _counted(n: int) -> None:
    if PROFILE is not None:
        PROFILE.enable() if n else PROFILE.disable()
        return
    subprocess.run(["callgrind_control", "-i", "on" if n else "off", str(os.getpid())], check=True, capture_output=True)


async def _floor(args: argparse.Namespace) -> None:
    """aiohttp alone, each half of a relay: its server answering a canned body (`server`), or its
    client posting to the mock and reading the answer (`client`, with no timeout, as cheap as it gets)."""
    import aiohttp
    from aiohttp import web

    from mock_upstream import openai_bodies

    if args.target == "server":
        canned = openai_bodies(50)[0]

        async def answer(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(body=canned, content_type="application/json")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        await _drive(args.port, "chat", 200)
        _counted(1)
        await _drive(args.port, "chat", args.requests)
        _counted(0)
        await runner.cleanup()
        return
    body, url = BODIES["chat"].encode(), f"http://127.0.0.1:{args.mock}/v1/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer mock"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def run(n: int) -> None:
            todo = iter(range(n))

            async def worker() -> None:
                for _ in todo:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()

            await asyncio.gather(*(worker() for _ in range(8)))

        await run(200)
        _counted(1)
        await run(args.requests)
        _counted(0)


def serve(args: argparse.Namespace) -> None:
    """Inside callgrind: start the target, warm up, count `args.requests` requests, stop."""
    from aiohttp import web

    if args.target in ("server", "client"):
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(_floor(args))
        return
    if args.target == "bare":
        from bare_relay import make_app

        app, runner_class = make_app(f"http://127.0.0.1:{args.mock}"), web.AppRunner
    else:
        from proxy import config as configuration, logs
        from proxy.app import STORE, create_app
        from proxy.protocol import Runner

        cfg = configuration.load(args.config)
        cfg.server.port = args.port
        # Periodic work at the pace of real load, not once a second of callgrind's slow time.
        cfg.ledger.flush_interval = cfg.keys.refresh_interval = 3600.0
        logs.setup(cfg.logging, stream=open(os.devnull, "w"), cache=True)
        logs.FLUSH_EVERY = 50.0
        app, runner_class = create_app(cfg), Runner
    ledger = app.get(STORE) if args.target == "turnstile" else None

    async def main() -> None:
        runner = runner_class(app, access_log=None, handle_signals=False, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        if args.target == "turnstile":  # the collector as `turnstile serve` leaves it
            from proxy.server import settle_collector

            settle_collector()
        # Warm-up: 1,023 requests, their rows written in one batch. The ledger has then compiled the
        # INSERT of each batch size it uses (powers of two up to 512), as under steady load.
        path = PATHS.get(args.scenario, "/v1/chat/completions") if args.target == "turnstile" else "/v1/chat/completions"
        await _drive(args.port, args.scenario, 1023, path)
        if ledger is not None:
            await ledger.flush()
        _counted(1)
        await _drive(args.port, args.scenario, args.requests, path)
        if ledger is not None:
            await ledger.flush()  # the measured requests' rows, as one batch: part of their cost
        _counted(0)
        await runner.cleanup()

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())


def count(target: str, args: argparse.Namespace, tmp: Path, mock: int, config: Path) -> float:
    out = tmp / f"callgrind.{target}.out"
    if args.profile:  # natively, the profile to stdout
        subprocess.run([sys.executable, __file__, "--serve", target, "--scenario", args.scenario, "--requests",
                        str(args.requests), "--mock", str(mock), "--port", str(free_port()), "--config", str(config),
                        "--profile", str(args.profile)], check=True)
        return 0.0
    subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                    sys.executable, __file__, "--serve", target, "--scenario", args.scenario, "--requests",
                    str(args.requests), "--mock", str(mock), "--port", str(free_port()),
                    "--config", str(config)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    totals = re.findall(r"^totals: (\d+)", out.read_text(), re.M)
    return int(totals[-1]) / args.requests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", choices=sorted(BODIES), default="chat")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--floor", action="store_true",
                    help="also count aiohttp alone: its server with a canned answer, its client alone (chat)")
    ap.add_argument("--store", default="", help="the gateway's store, e.g. postgresql://user@127.0.0.1/db (an empty "
                    "database; default: a SQLite file). The database server's own work is not counted")
    ap.add_argument("--serve", choices=["bare", "turnstile", "server", "client"], help=argparse.SUPPRESS)
    for name in ("--mock", "--port"):
        ap.add_argument(name, type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--config", default="", help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=["turnstile"], help="count Turnstile only (the bare relay moves by about 1%%)")
    ap.add_argument("--keep", default="", metavar="DIR", help="keep callgrind's output files in DIR, for callgrind_annotate")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="no count: run Turnstile natively under cProfile and print its N costliest functions "
                    "(own time), to see where the count goes")
    args = ap.parse_args()
    if args.floor and args.scenario != "chat":
        ap.error("--floor measures the chat scenario only")
    if args.serve:
        args.target = args.serve
        if args.profile:
            global PROFILE
            PROFILE = cProfile.Profile()
        serve(args)
        if PROFILE is not None:
            stats = pstats.Stats(PROFILE)
            stats.sort_stats("tottime").print_stats(args.profile)
            by_file: dict[str, float] = {}
            for (filename, _, _), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
                by_file[filename] = by_file.get(filename, 0.0) + own
            total = sum(by_file.values())
            print("own time by file, per request:")
            for filename, own in sorted(by_file.items(), key=lambda kv: -kv[1])[:args.profile]:
                print(f"  {own / args.requests * 1e6:8.1f} us  {own / total:6.1%}  {filename}")
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    from proxy.store import create_key

    tmp = Path(tempfile.mkdtemp(prefix="turnstile-instructions-"))
    mock = free_port()
    store = args.store or str(tmp / "keys.db")
    key = create_key(store, "bench", "1000000")
    config = tmp / "turnstile.toml"
    config.write_text(f'[server]\ntrusted_proxies = ["127.0.0.1/32"]\n[store]\nurl = "{store}"\n'
                      f'[ledger]\njournal = "{tmp}/ledger"\n[logging]\nformat = "json"\n' + CONFIG.get(args.scenario, ""))
    os.environ.update({"BENCH_KEY": key,  # in the environment, not on command lines that `ps` shows
                       **PROVIDER_KEYS, "OPENROUTER_BASE_URL": f"http://127.0.0.1:{mock}/v1",
                       "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{mock}", "GEMINI_BASE_URL": f"http://127.0.0.1:{mock}/v1beta"})
    upstream = subprocess.Popen([sys.executable, str(HERE / "mock_upstream.py"), "--port", str(mock), "--chunks", "50"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(mock)
        if args.profile:
            count("turnstile", args, tmp, mock, config)
            return 0
        bare = count("bare", args, tmp, mock, config) if args.only is None else 0.0
        ours = count("turnstile", args, tmp, mock, config)
        floor = {half: count(half, args, tmp, mock, config) for half in ("server", "client")} if args.floor else {}
    finally:
        upstream.terminate()
        upstream.wait()
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            for out in tmp.glob("callgrind.*.out"):
                shutil.copy(out, Path(args.keep) / f"{args.scenario}.{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.scenario}, {args.requests} requests, 8 at a time: instructions per request")
    if bare:
        print(f"  bare relay  {bare:>12,.0f}")
        print(f"  turnstile   {ours:>12,.0f}   {ours / bare:.2f}x bare, own work {ours - bare:,.0f}")
    else:
        print(f"  turnstile   {ours:>12,.0f}")
    if floor:
        print(f"  aiohttp alone: server (canned answer) {floor['server']:,.0f}, client {floor['client']:,.0f}, "
              f"together {floor['server'] + floor['client']:,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
