"""The edge's circuit breakers as a state machine, on an injected clock: what opens one, what an
open one answers, the one probe of a half-open one and what its outcome does."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Coroutine
from typing import Any

import pytest
from nats.aio.client import Client

from bus.errors import (
    DeadlineError,
    InternalError,
    NoReplyError,
    NoResponderError,
    NotConnectedError,
    NotFoundError,
    RateLimitedError,
    RuleViolationError,
    UnavailableError,
    ValidationError,
)
from http_edge.breaker import Breaker, Breakers, CircuitOpenError, CircuitState
from http_edge.errors import error_response

SUBJECT = "orders.cmd.pay"
NC = Client()  # never connected: the breakers hand it to their `send`, which here is no NATS


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Service:
    """What the breakers send to in place of NATS (`bus.client.call`'s signature): each request's
    outcome is planned under its body; counts what reached it."""

    def __init__(self) -> None:
        self.sent = 0
        self._plans: dict[bytes, tuple[BaseException | None, asyncio.Event | None]] = {}
        self._ids = itertools.count()

    async def send(self, nc: Client, subject: str, body: bytes, *, headers: dict[str, str] | None = None,
                   timeout: float = 5.0) -> bytes:
        self.sent += 1
        failure, gate = self._plans.pop(body)
        if gate is not None:
            await gate.wait()
        if failure is not None:
            raise failure
        return b"{}"

    def request(self, breaker: Breaker, failure: BaseException | None = None,
                gate: asyncio.Event | None = None) -> Coroutine[Any, Any, bytes]:
        """A request through `breaker` whose outcome (once sent) is `failure`, or an answer, after `gate`."""
        body = b"%d" % next(self._ids)
        self._plans[body] = (failure, gate)
        return breaker.request(NC, body, None, 5.0)


def breakers(failures: int = 3, cooldown_s: float = 5.0) -> tuple[Breakers, Service, Clock, Clock]:
    clock, wall, service = Clock(), Clock(1_700_000_000.0), Service()
    return Breakers(failures, cooldown_s, send=service.send, clock=clock, wall=wall), service, clock, wall


async def fail(breaker: Breaker, service: Service, exc: BaseException) -> None:
    with pytest.raises(type(exc)):
        await service.request(breaker, exc)


async def refused(breaker: Breaker, service: Service) -> CircuitOpenError:
    before = service.sent
    with pytest.raises(CircuitOpenError) as caught:
        await service.request(breaker)
    assert service.sent == before, "a refused request reached the service"
    return caught.value


async def open_one(failures: int = 3, cooldown_s: float = 5.0) -> tuple[Breaker, Service, Clock]:
    registry, service, clock, _ = breakers(failures, cooldown_s)
    breaker = registry[SUBJECT]
    for _ in range(failures):
        await fail(breaker, service, NoResponderError(f"no service answers {SUBJECT}"))
    assert not breaker.closed
    return breaker, service, clock


async def test_failures_in_a_row_open_the_breaker_and_it_then_refuses_unsent() -> None:
    registry, service, _, _ = breakers(failures=3)
    breaker = registry[SUBJECT]
    await fail(breaker, service, NoResponderError("no service answers"))
    await fail(breaker, service, NoReplyError(f"{SUBJECT} did not answer within 5s"))
    assert breaker.closed and breaker.state().failures == 2
    await fail(breaker, service, InternalError("internal error; see the service log"))
    assert breaker.state().state == "open"
    assert service.sent == 3
    await refused(breaker, service)
    await refused(breaker, service)
    assert breaker.state().refused == 2


@pytest.mark.parametrize("answer", [
    ValidationError("quantity must be > 0", field="quantity"), NotFoundError("no order o-1"),
    RuleViolationError("not paid"), RateLimitedError("slow down"),
    DeadlineError("the orders read model has not reached sequence 9 yet"),  # a coded reply, not silence
    UnavailableError("the read-model database is unavailable; retry shortly"),  # the service is there
], ids=lambda e: type(e).__name__)
async def test_what_a_service_answers_is_never_a_failure(answer: Exception) -> None:
    registry, service, _, _ = breakers(failures=2)
    breaker = registry[SUBJECT]
    for _ in range(10):
        await fail(breaker, service, answer)
    assert breaker.closed and breaker.failures == 0


async def test_an_answer_resets_the_count() -> None:
    registry, service, _, _ = breakers(failures=3)
    breaker = registry[SUBJECT]
    for answer in (None, ValidationError("bad")):
        await fail(breaker, service, NoReplyError("silent"))
        await fail(breaker, service, NoReplyError("silent"))
        if answer is None:
            await service.request(breaker)
        else:
            await fail(breaker, service, answer)
        assert breaker.closed and breaker.failures == 0
    await fail(breaker, service, NoReplyError("silent"))
    await fail(breaker, service, NoReplyError("silent"))
    assert breaker.closed


async def test_neither_our_own_connection_down_nor_a_cancel_counts() -> None:
    registry, service, _, _ = breakers(failures=2)
    breaker = registry[SUBJECT]
    for _ in range(5):
        await fail(breaker, service, NotConnectedError("not connected to NATS (reconnecting)"))
        await fail(breaker, service, asyncio.CancelledError())
    assert breaker.closed and breaker.failures == 0


async def test_an_open_breaker_says_how_long_rounded_up_names_the_subject_and_that_nothing_was_sent() -> None:
    breaker, service, clock = await open_one(cooldown_s=5.0)
    assert (await refused(breaker, service)).retry_after_s == 5
    clock.now += 1.2
    error = await refused(breaker, service)
    assert error.retry_after_s == 4 and error.status == 503 and error.code == "circuit_open"
    assert SUBJECT in error.message and "not sent, so nothing was done" in error.message
    assert "retry in 4 s" in error.message and "no service answers" in error.message  # the cause
    clock.now += 3.75  # 0.05 s left: still at least 1
    assert (await refused(breaker, service)).retry_after_s == 1
    assert breaker.state().state == "open"


async def test_the_refusal_is_a_503_with_its_retry_after_in_the_edges_error_format() -> None:
    breaker, service, clock = await open_one(cooldown_s=5.0)
    clock.now += 2.5
    response = error_response(await refused(breaker, service))
    assert response.status == 503 and response.headers["Retry-After"] == "3"
    assert response.text is not None
    error = json.loads(response.text)["error"]
    assert error["code"] == "circuit_open" and SUBJECT in error["message"]


async def test_after_the_cool_down_exactly_one_probe_goes_and_its_answer_closes_the_breaker() -> None:
    breaker, service, clock = await open_one(cooldown_s=5.0)
    clock.now += 5.0
    assert breaker.state().state == "half_open" and breaker.state().retry_after_s == 0
    gate = asyncio.Event()
    probe = asyncio.create_task(service.request(breaker, gate=gate))
    await asyncio.sleep(0)
    assert service.sent == 4 and breaker.state().probing
    for _ in range(3):  # others meanwhile: refused, told to come back soon
        assert (await refused(breaker, service)).retry_after_s == 1
    gate.set()
    assert await probe == b"{}"
    state = breaker.state()
    assert state.state == "closed" and state.failures == 0 and state.opened_at is None and not state.probing
    await service.request(breaker)
    await service.request(breaker)
    assert service.sent == 6


async def test_a_probe_answered_with_a_refusal_closes_the_breaker_too() -> None:
    breaker, service, clock = await open_one()
    clock.now += 5.0
    await fail(breaker, service, NotFoundError("no such order"))  # the service is there and decided
    assert breaker.closed


async def test_a_failed_probe_opens_the_breaker_for_another_cool_down() -> None:
    breaker, service, clock = await open_one(failures=3, cooldown_s=5.0)
    clock.now += 6.0
    await fail(breaker, service, NoReplyError("still silent"))
    state = breaker.state()
    assert state.state == "open" and state.retry_after_s == 5 and state.opened == 2 and state.failures == 4
    assert (await refused(breaker, service)).retry_after_s == 5
    clock.now += 5.0
    await service.request(breaker)  # the next probe
    assert breaker.closed


async def test_a_cancelled_probe_frees_the_half_open_slot() -> None:
    breaker, service, clock = await open_one()
    clock.now += 5.0

    probe = asyncio.create_task(service.request(breaker, gate=asyncio.Event()))  # never answered
    await asyncio.sleep(0)
    await refused(breaker, service)
    probe.cancel()  # the client went away (or the edge is stopping)
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert breaker.state().state == "half_open" and not breaker.state().probing
    await service.request(breaker)  # the next request is the probe
    assert breaker.closed


async def test_a_probe_cut_short_by_our_own_connection_frees_the_slot_and_counts_nothing() -> None:
    breaker, service, clock = await open_one()
    clock.now += 5.0
    await fail(breaker, service, NotConnectedError("not connected to NATS (reconnecting)"))
    assert breaker.state().state == "half_open" and breaker.state().opened == 1
    await service.request(breaker)
    assert breaker.closed


async def test_requests_sent_before_the_breaker_opened_do_not_move_it() -> None:
    registry, service, _, _ = breakers(failures=2, cooldown_s=5.0)
    breaker = registry[SUBJECT]
    gate = asyncio.Event()
    early = [asyncio.create_task(service.request(breaker, f, gate)) for f in (NoReplyError("late"), None)]
    await asyncio.sleep(0)
    await fail(breaker, service, NoReplyError("silent"))
    await fail(breaker, service, NoReplyError("silent"))
    assert breaker.state().state == "open"
    gate.set()
    await asyncio.gather(*early, return_exceptions=True)
    state = breaker.state()  # neither the late failure (another cool-down) nor the late answer (closed)
    assert state.state == "open" and state.opened == 1 and state.retry_after_s == 5


async def test_zero_failures_disables_breaking() -> None:
    registry, service, _, _ = breakers(failures=0)
    breaker = registry[SUBJECT]
    for _ in range(20):
        await fail(breaker, service, NoReplyError("silent"))
    assert breaker.closed and service.sent == 20


async def test_turning_breaking_off_closes_open_breakers_and_a_new_policy_applies_to_all() -> None:
    registry, service, clock, _ = breakers(failures=2, cooldown_s=5.0)
    breaker = registry[SUBJECT]
    for _ in range(2):
        await fail(breaker, service, NoReplyError("silent"))
    assert not breaker.closed
    registry.configure(failures=0)  # the operator's "stop refusing", live
    assert breaker.closed and registry["orders.query.get"].closed
    for _ in range(5):
        await fail(breaker, service, NoReplyError("silent"))
    assert breaker.closed and service.sent == 7  # nothing refused any more
    registry.configure(failures=1, cooldown_s=30.0)
    await fail(breaker, service, NoReplyError("silent"))
    assert not breaker.closed and breaker.state().retry_after_s == 30


async def test_each_subject_has_its_own_breaker_and_states_are_plain_data() -> None:
    registry, service, clock, wall = breakers(failures=1, cooldown_s=5.0)
    await service.request(registry["orders.query.get"])
    await fail(registry[SUBJECT], service, NoResponderError("no service answers"))
    clock.now += 2.0
    assert registry.states() == [
        CircuitState(subject="orders.cmd.pay", state="open", failures=1, opened_at=wall.now, retry_after_s=3,
                     probing=False, opened=1, refused=0),
        CircuitState(subject="orders.query.get", state="closed", failures=0, opened_at=None, retry_after_s=None,
                     probing=False, opened=0, refused=0),
    ]
    await service.request(registry["orders.query.get"])  # unaffected by the other's state


async def test_one_log_line_per_state_change_never_one_per_refusal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="http_edge.breaker")
    breaker, service, clock = await open_one(failures=3, cooldown_s=5.0)
    for _ in range(50):
        await refused(breaker, service)
    clock.now += 5.0
    await fail(breaker, service, NoReplyError("still silent"))  # a failed probe
    for _ in range(50):
        await refused(breaker, service)
    clock.now += 5.0
    await service.request(breaker)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "http_edge.breaker"]
    assert [level for level, _ in lines] == ["WARNING", "INFO", "INFO"], lines
    assert "open after 3 failures in a row" in lines[0][1] and SUBJECT in lines[0][1]
    assert "the probe failed" in lines[1][1]
    assert "closed" in lines[2][1] and "100 requests refused" in lines[2][1]


def test_settings_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError):
        Breakers(-1, 5.0)
    with pytest.raises(ValueError):
        Breakers(5, 0.0)
