"""One log line when something a loop depends on goes away, one when it is back: an outage
of NATS or PostgreSQL reads as two state changes, not a line per attempt or request."""

from __future__ import annotations

import logging
import time


class Outage:
    """What one loop knows of its dependency: `failed` on every failed attempt (logs the first
    only, at WARNING), `ok` after every success (logs the end of an outage, at INFO, with how
    long it lasted)."""

    __slots__ = ("_log", "_what", "since", "reason")

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self._what = what
        self.since: float | None = None
        self.reason = ""

    def failed(self, reason: object) -> None:
        if self.since is None:
            self.since, self.reason = time.monotonic(), str(reason)
            self._log.warning("%s: %s; retrying until it is back", self._what, self.reason)

    def ok(self) -> None:
        if self.since is not None:
            self._log.info("%s: back after %.1fs (was: %s)", self._what, time.monotonic() - self.since, self.reason)
            self.since = None
