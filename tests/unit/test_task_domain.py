"""The task decider: given events → decide → expected events, and the work items they dispatch."""

from __future__ import annotations

from functools import reduce

import pytest

from actors.errors import NotFoundError, RuleViolationError, ValidationError
from actors.tasks import domain
from actors.tasks.messages import (
    CancelTask,
    ClaimTask,
    CompleteTask,
    Dispatch,
    FailTask,
    RetryPolicy,
    RetryTask,
    StartTask,
    SubmitTask,
    TaskCancelled,
    TaskCompleted,
    TaskDeadLettered,
    TaskEvent,
    TaskFailed,
    TaskRequeued,
    TaskStarted,
    TaskSubmitted,
)

TID = "t1"
POLICY = RetryPolicy(max_attempts=2, backoff_s=1.0, backoff_max_s=10.0, jitter=0.0)
SUBMITTED = TaskSubmitted(task_id=TID, at=100.0, task_type="echo", payload={"x": 1}, priority="high",
                          run_at=100.0, timeout_s=5.0, retry=POLICY)
STARTED = TaskStarted(task_id=TID, at=101.0, attempt=1, worker="w")


def given(*events: TaskEvent) -> domain.Task:
    return reduce(domain.evolve, events, domain.INITIAL)


def test_submit_records_the_task_and_dispatches_its_first_attempt() -> None:
    events = domain.decide(given(), SubmitTask(type="echo", payload={"x": 1}, priority="high", timeout_s=5.0,
                                               retry=POLICY, task_id=TID, at=100.0))
    assert events == [SUBMITTED]
    assert domain.dispatches(given(), events) == [("high", Dispatch(task_id=TID, attempt=1, run_at=100.0))]


def test_a_delay_schedules_the_task() -> None:
    [event] = domain.decide(given(), SubmitTask(type="echo", delay_s=30, task_id=TID, at=100.0))
    assert isinstance(event, TaskSubmitted) and event.run_at == 130.0
    assert given(event).status == "scheduled"


def test_delay_and_run_at_together_are_refused() -> None:
    with pytest.raises(ValidationError):
        domain.decide(given(), SubmitTask(type="echo", delay_s=1, run_at=5, task_id=TID, at=1.0))


def test_start_before_run_at_emits_nothing() -> None:
    state = given(TaskSubmitted(task_id=TID, at=100.0, task_type="echo", priority="low", run_at=200.0,
                                timeout_s=5.0, retry=POLICY))
    assert domain.decide(state, StartTask(task_id=TID, attempt=1, worker="w", at=150.0)) == []


def test_a_stale_attempt_cannot_start() -> None:
    with pytest.raises(RuleViolationError, match="stale"):
        domain.decide(given(SUBMITTED), StartTask(task_id=TID, attempt=2, worker="w", at=101.0))


def test_a_lost_lease_lets_the_same_attempt_start_again() -> None:
    events = domain.decide(given(SUBMITTED, STARTED), StartTask(task_id=TID, attempt=1, worker="w2", at=140.0))
    assert events == [TaskStarted(task_id=TID, at=140.0, attempt=1, worker="w2")]


def test_completion_is_recorded_once() -> None:
    done = TaskCompleted(task_id=TID, at=102.0, attempt=1, task_type="echo", result=7)
    assert domain.decide(given(SUBMITTED, STARTED), CompleteTask(task_id=TID, attempt=1, result=7, at=102.0)) == [done]
    assert domain.decide(given(SUBMITTED, STARTED, done), CompleteTask(task_id=TID, attempt=1, result=7, at=103.0)) == []


def test_a_claim_stores_nothing_and_refuses_what_may_not_run() -> None:
    assert domain.decide(given(SUBMITTED), ClaimTask(task_id=TID, attempt=1, at=101.0)) == []
    with pytest.raises(RuleViolationError, match="stale"):
        domain.decide(given(SUBMITTED), ClaimTask(task_id=TID, attempt=2, at=101.0))
    cancelled = TaskCancelled(task_id=TID, at=101.0)
    with pytest.raises(RuleViolationError, match="cancelled"):
        domain.decide(given(SUBMITTED, cancelled), ClaimTask(task_id=TID, attempt=1, at=102.0))


def test_a_claimed_attempt_that_ends_records_its_start_in_the_outcome() -> None:
    complete = CompleteTask(task_id=TID, attempt=1, result=7, started_at=101.5, worker="w", at=102.0)
    assert domain.decide(given(SUBMITTED), complete) == [
        TaskCompleted(task_id=TID, at=102.0, attempt=1, task_type="echo", result=7, started_at=101.5, worker="w")]
    fail = FailTask(task_id=TID, attempt=1, error="x", started_at=101.5, worker="w", at=110.0)
    [failed] = domain.decide(given(SUBMITTED), fail)
    assert failed == TaskFailed(task_id=TID, at=110.0, attempt=1, error="x", retry_at=111.0, started_at=101.5, worker="w")
    # Once the start is stored (a long run), the outcome does not repeat it.
    assert domain.decide(given(SUBMITTED, STARTED), complete) == [
        TaskCompleted(task_id=TID, at=102.0, attempt=1, task_type="echo", result=7)]
    # Without a start, an outcome of a task nobody runs is refused.
    with pytest.raises(RuleViolationError):
        domain.decide(given(SUBMITTED), CompleteTask(task_id=TID, attempt=1, at=102.0))


def test_failure_retries_with_exponential_backoff_then_dead_letters() -> None:
    [failed] = domain.decide(given(SUBMITTED, STARTED), FailTask(task_id=TID, attempt=1, error="x", at=110.0))
    assert failed == TaskFailed(task_id=TID, at=110.0, attempt=1, error="x", retry_at=111.0)
    state = given(SUBMITTED, STARTED, failed)
    assert state.status == "retrying" and state.attempt == 2
    assert domain.dispatches(state, [failed]) == [("high", Dispatch(task_id=TID, attempt=2, run_at=111.0))]
    started2 = TaskStarted(task_id=TID, at=112.0, attempt=2, worker="w")
    [dead] = domain.decide(given(SUBMITTED, STARTED, failed, started2), FailTask(task_id=TID, attempt=2, error="y", at=113.0))
    assert isinstance(dead, TaskDeadLettered) and dead.attempt == 2


def test_backoff_doubles_is_capped_and_jitter_stays_in_bounds() -> None:
    policy = RetryPolicy(backoff_s=1.0, backoff_max_s=5.0, jitter=0.5)
    for attempt, base in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)):
        delay = domain.backoff("task", attempt, policy)
        assert base * 0.5 <= delay <= base * 1.5
    assert domain.backoff("a", 1, policy) == domain.backoff("a", 1, policy)


def test_retry_of_a_dead_task_requeues_with_fresh_attempts() -> None:
    dead = TaskDeadLettered(task_id=TID, at=120.0, attempt=2, error="y", task_type="echo")
    state = given(SUBMITTED, dead)
    [requeued] = domain.decide(state, RetryTask(task_id=TID, at=130.0))
    assert requeued == TaskRequeued(task_id=TID, at=130.0, attempt=3, limit=4)
    assert domain.dispatches(state, [requeued]) == [("high", Dispatch(task_id=TID, attempt=3, run_at=130.0))]
    with pytest.raises(RuleViolationError):
        domain.decide(given(SUBMITTED), RetryTask(task_id=TID, at=1.0))


def test_cancel_marks_running_tasks_and_refuses_finished_ones() -> None:
    [cancelled] = domain.decide(given(SUBMITTED, STARTED), CancelTask(task_id=TID, at=105.0))
    assert cancelled == TaskCancelled(task_id=TID, at=105.0, was_running=True)
    with pytest.raises(RuleViolationError):
        domain.decide(given(SUBMITTED, cancelled), CancelTask(task_id=TID, at=106.0))
    with pytest.raises(RuleViolationError):
        domain.decide(given(SUBMITTED, cancelled), StartTask(task_id=TID, attempt=1, worker="w", at=107.0))


def test_commands_on_unknown_tasks_are_not_found() -> None:
    with pytest.raises(NotFoundError):
        domain.decide(given(), CancelTask(task_id=TID, at=1.0))
