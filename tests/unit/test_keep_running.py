"""A role's loop that dies on an unexpected error is run again, unless the role is stopping."""

from __future__ import annotations

from infra.bootstrap import keep_running


class _Dies:
    def __init__(self, times: int, stopping: bool = False) -> None:
        self.runs = 0
        self.times = times
        self.stopping = stopping

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= self.times:
            raise RuntimeError("a bug its own loop does not handle")


async def test_a_loop_that_dies_is_run_again_until_it_returns() -> None:
    loop = _Dies(times=1)
    await keep_running("test loop", loop)
    assert loop.runs == 2


async def test_a_loop_that_dies_while_stopping_is_left_dead() -> None:
    loop = _Dies(times=5, stopping=True)
    await keep_running("test loop", loop)
    assert loop.runs == 1
