"""A SIGTERM or SIGINT that comes while the process is still starting (importing, building the app,
syncing the catalog), before its event loop or supervisor takes the signals: it is noted, and the
process stops as soon as it can, cleanly, instead of dying by the signal with a traceback. Light on
purpose: the command installs it before it imports the server."""

from __future__ import annotations

import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)
asked = False


def _ask(signum: int, frame: object) -> None:
    """The first signal is noted; a second one, while start-up is still slow (a catalog sync waiting
    on its provider), stops the process at once, as the default would."""
    global asked
    if asked:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # still here: PID 1 of a container, whom the kernel spares the default
    asked = True


def _note(signum: int, frame: object) -> None:
    global asked
    asked = True


def catch(signals: tuple[signal.Signals, ...] = SIGNALS, escalate: bool = True) -> None:
    """`escalate`: a second signal stops at once. Not for a worker: a SIGTERM sent to the whole
    process group (systemd, `timeout`, `kill -- -PGID`) reaches it twice, once more through its
    supervisor."""
    for sig in signals:
        signal.signal(sig, _ask if escalate else _note)


def ignore() -> None:
    """Once stopped, a second SIGTERM or SIGINT must not turn the exit into a death by signal (the
    interpreter restores the default handlers while it shuts down)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
