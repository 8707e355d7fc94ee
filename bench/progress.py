"""Progress lines of `make bench`, on stderr, each with the time since start."""

from __future__ import annotations

import sys
import time

_started = time.monotonic()


def say(message: str) -> None:
    print(f"[bench {time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True)
