"""Circuit breaking at the edge: one breaker per NATS subject the edge requests
(`<context>.cmd.<name>`, `<context>.query.<name>`: its routes' subjects, a bounded set; they
carry no aggregate id).

Closed, requests go. `failures` failures in a row open it: no responder, no reply in time, a
coded `internal` reply. Open, every request to the subject is refused at once, unsent
(`CircuitOpenError`: 503 with Retry-After), for `cooldown_s`; then it is half-open: one request,
the probe, goes while the others are still refused; an answer closes the breaker, a failure opens
it for another cool-down. Whatever the service answered otherwise (a 4xx, a coded `timeout` or
`unavailable`) is an answer: the service is there and decided. This process's own NATS connection
being down is neither (every subject would open, and stay open a cool-down past the reconnect).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec
from nats.aio.client import Client

from bus.client import call
from bus.errors import InternalError, JetsourceError, NoReplyError, NoResponderError, NotConnectedError, UnavailableError

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class Send(Protocol):
    """How a request goes out: `bus.client.call`'s signature."""

    def __call__(self, nc: Client, subject: str, body: bytes, *, headers: dict[str, str] | None = None,
                 timeout: float = 5.0) -> Awaitable[bytes]: ...

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
LEVEL = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # the state gauge's values


class CircuitOpenError(UnavailableError):
    """A subject's breaker is open: the request was refused at the edge and never sent."""

    code = "circuit_open"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CircuitState(msgspec.Struct, frozen=True, kw_only=True):
    """One breaker as /readyz, /metrics and the dashboard show it."""

    subject: str
    state: str  # closed | half_open | open
    failures: int  # failures in a row (while not closed: the ones that opened it, and failed probes)
    opened_at: float | None  # epoch seconds it last opened; None while closed
    retry_after_s: int | None  # open: whole seconds until a probe may go; half-open: 0; closed: None
    probing: bool  # half-open with its probe in flight
    opened: int  # times it opened, in all (a failed probe opens it again)
    refused: int  # requests it refused unsent, in all


def _verdict(exc: BaseException) -> bool | None:
    """What an outcome says of the subject's service: True a failure, False an answer, None
    nothing (cancelled: the client went away; our own connection is down; a failure here)."""
    if isinstance(exc, NotConnectedError):
        return None
    if isinstance(exc, NoResponderError | NoReplyError | InternalError):
        return True
    if isinstance(exc, JetsourceError):
        return False
    return None


class Breaker:
    """One subject's breaker (see the module). `closed` is the one check a request pays while
    all is well, and a closed breaker's answered request one more (`failures`)."""

    __slots__ = ("subject", "closed", "failures", "opened", "refused", "_send", "_threshold", "_cooldown", "_clock",
                 "_wall", "_until", "_probing", "_opened_at", "_since", "_refused_since", "_last")

    def __init__(self, subject: str, send: Send, threshold: int, cooldown_s: float, clock: Clock, wall: Clock) -> None:
        self.subject = subject
        self._send = send
        self.closed = True
        self.failures = 0
        self.opened = 0
        self.refused = 0
        self._threshold = threshold  # 0: never opens
        self._cooldown = cooldown_s
        self._clock = clock
        self._wall = wall
        self._until = 0.0  # on `clock`: when a probe may go
        self._probing = False
        self._opened_at = 0.0  # on `wall`
        self._since = 0.0  # on `clock`: when this outage opened the breaker first
        self._refused_since = 0
        self._last = ""  # the last failure's message

    async def request(self, nc: Client, body: bytes, headers: dict[str, str] | None, timeout: float) -> bytes:
        """A request to the subject (as `bus.client.call`): refused at once, unsent, with
        CircuitOpenError while the breaker is open (or half-open with its probe out), else sent
        and its outcome counted. Positional, no wrapper per call: this is the hot path."""
        probe = False if self.closed else self._admit()
        try:
            result = await self._send(nc, self.subject, body, headers=headers, timeout=timeout)
        except BaseException as exc:  # CancelledError too: a probe must give its slot back
            verdict = _verdict(exc)
            if verdict:
                self._failed(probe, exc)
            elif verdict is False:
                self._answered(probe)
            elif probe:
                self._probing = False  # the next request probes instead
            raise
        if probe or self.failures:
            self._answered(probe)
        return result

    def _admit(self) -> bool:
        """True for the probe; refuses anything else."""
        now = self._clock()
        if now >= self._until and not self._probing:
            self._probing = True
            log.debug("circuit for %s half-open: one probe goes", self.subject)
            return True
        self.refused += 1
        wait = max(1, math.ceil(self._until - now))  # a probe in flight: soon
        raise CircuitOpenError(
            f"{self.subject} keeps failing (the last: {self._last}); this request was not sent, so nothing "
            f"was done for it: retry in {wait} s", retry_after_s=wait)

    def _answered(self, probe: bool) -> None:
        if probe:
            self.closed = True
            self._probing = False
            self.failures = 0
            log.info("circuit for %s closed: the probe was answered, %.1fs after it opened (%d requests refused)",
                     self.subject, self._clock() - self._since, self.refused - self._refused_since)
        elif self.closed:
            self.failures = 0

    def _failed(self, probe: bool, exc: BaseException) -> None:
        if not (probe or self.closed):
            return  # sent before the breaker opened: now only the probe's outcome moves it
        self.failures += 1
        self._last = exc.message if isinstance(exc, JetsourceError) else type(exc).__name__
        if probe and not self._threshold:  # breaking was turned off while the probe was out
            self.closed, self._probing, self.failures = True, False, 0
        elif probe:
            self._probing = False
            self._open()
            # The outage's WARNING was the first opening; each failed probe is one line, not an alarm.
            log.info("circuit for %s still open: the probe failed (%s); refusing its requests for another %gs",
                     self.subject, self._last, self._cooldown)
        elif self._threshold and self.failures >= self._threshold:
            self._since = self._clock()
            self._refused_since = self.refused
            self._open()
            log.warning("circuit for %s open after %d failures in a row (the last: %s): its requests are refused "
                        "for %gs, then one probe goes", self.subject, self.failures, self._last, self._cooldown)

    def _open(self) -> None:
        self.closed = False
        self._until = self._clock() + self._cooldown
        self._opened_at = self._wall()
        self.opened += 1

    def configure(self, threshold: int, cooldown_s: float) -> None:
        """A new policy; threshold 0 (breaking turned off) closes the breaker at once."""
        self._threshold = threshold
        self._cooldown = cooldown_s
        if threshold == 0 and not self.closed:
            self.closed, self._probing, self.failures = True, False, 0
            log.info("circuit for %s closed: breaking was turned off", self.subject)

    def state(self) -> CircuitState:
        """The breaker now, as plain data."""
        if self.closed:
            name, opened_at, retry_after = CLOSED, None, None
        else:
            now = self._clock()
            opened_at = self._opened_at
            name, retry_after = (OPEN, max(1, math.ceil(self._until - now))) if now < self._until else (HALF_OPEN, 0)
        return CircuitState(subject=self.subject, state=name, failures=self.failures, opened_at=opened_at,
                            retry_after_s=retry_after, probing=self._probing, opened=self.opened,
                            refused=self.refused)


class Breakers(dict[str, Breaker]):
    """Every subject's breaker, made on its first request: `breakers[subject]` is a plain dict
    hit on the hot path. `failures` 0 disables breaking (the breakers still count)."""

    def __init__(self, failures: int = 5, cooldown_s: float = 5.0, *, send: Send = call,
                 clock: Clock = time.monotonic, wall: Clock = time.time) -> None:
        super().__init__()
        if failures < 0 or cooldown_s <= 0:
            raise ValueError(f"breaker failures must be >= 0 and its cool-down > 0, not {failures}, {cooldown_s}")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._send = send
        self._clock = clock
        self._wall = wall

    def configure(self, *, failures: int | None = None, cooldown_s: float | None = None) -> None:
        """Change the policy of every breaker, now and to come (live configuration); an open one
        keeps the cool-down it opened with."""
        if failures is not None:
            self.failures = failures
        if cooldown_s is not None:
            self.cooldown_s = cooldown_s
        for breaker in self.values():
            breaker.configure(self.failures, self.cooldown_s)

    def __missing__(self, subject: str) -> Breaker:
        breaker = self[subject] = Breaker(subject, self._send, self.failures, self.cooldown_s, self._clock, self._wall)
        return breaker

    def states(self) -> list[CircuitState]:
        """Every breaker's state as plain data, by subject (the dashboard's, /readyz's, /metrics')."""
        return [self[subject].state() for subject in sorted(self)]
