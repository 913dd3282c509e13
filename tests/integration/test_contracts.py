"""One behaviour suite for every declared context (the built-ins and examples/loyalty.py, loaded
by its setting): keyed repeats store once and answer the same, stale versions are refused and
concurrent writers retried, refusals are coded and store nothing, and a read waits for the
write it names. Each context says what to send in its declaration (`BoundedContext.contract`)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bus import subjects as h
from bus.client import call
from bus.errors import JetsourceError
from bus.eventstore import PartitionedStore, appended
from infra.bootstrap import nats_connection, run_actor
from infra.contexts import BoundedContext, Contract, declared
from infra.settings import Settings
from tests.conftest import System, make_settings, running

MODULES = "examples.loyalty"
CONTEXTS = [c for c in declared(Settings(_env_file=None, context_modules=MODULES)).contexts if c.contract]
_ids = itertools.count(1)


@pytest.fixture
async def world(partitions: int, namespace: str, nats_url: str, database_url: str) -> AsyncIterator[System]:
    async with running(make_settings(namespace, nats_url, database_url, context_modules=MODULES,
                                     partitions=partitions)) as system:
        yield system


def _contract(bc: BoundedContext) -> Contract:
    assert bc.contract is not None
    return bc.contract


async def _send(system: System, bc: BoundedContext, name: str, body: dict[str, Any] | bytes,
                headers: dict[str, str] | None = None) -> tuple[str | None, dict[str, Any]]:
    """(error code or None, reply body) of a command sent over NATS."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        return None, json.loads(await call(system.nc, system.ctx(bc.name).command(name), data, headers=headers))
    except JetsourceError as exc:
        return exc.code, {"field": exc.field, "message": exc.message}


async def _events(system: System, bc: BoundedContext, aggregate_id: str) -> int:
    ctx = system.ctx(bc.name)
    return sum(appended(e.headers) for e in await PartitionedStore.open(system.nc, ctx).load(ctx.events(aggregate_id)))


def _new_id(bc: BoundedContext) -> str:
    return f"contract-{bc.name}-{next(_ids)}"


@pytest.mark.parametrize("bc", CONTEXTS, ids=lambda c: c.name)
async def test_a_keyed_repeat_stores_once_and_answers_the_same(world: System, bc: BoundedContext) -> None:
    contract, aid = _contract(bc), _new_id(bc)
    name, body = contract.create(aid)
    key = {h.IDEMPOTENCY_KEY: f"key-{aid}"}
    first = await _send(world, bc, name, body, key)
    assert first[0] is None, first
    stored = await _events(world, bc, aid)
    assert await _send(world, bc, name, body, key) == first
    assert await _events(world, bc, aid) == stored
    other, other_body = contract.change(aid)  # another request under the same key
    code, _ = await _send(world, bc, other, other_body, key)
    assert code == "idempotency_key_reused"
    assert await _events(world, bc, aid) == stored


@pytest.mark.parametrize("bc", CONTEXTS, ids=lambda c: c.name)
async def test_a_stale_version_is_refused_and_concurrent_writers_are_retried(world: System, bc: BoundedContext) -> None:
    contract, aid = _contract(bc), _new_id(bc)
    code, created = await _send(world, bc, *contract.create(aid))
    assert code is None, created
    version = created["version"]
    stored = await _events(world, bc, aid)
    name, body = contract.change(aid)
    code, _ = await _send(world, bc, name, body, {h.EXPECTED_VERSION: str(version - 1)})
    assert code == "precondition_failed"
    assert await _events(world, bc, aid) == stored
    code, changed = await _send(world, bc, name, body, {h.EXPECTED_VERSION: str(version)})
    assert code is None and changed["version"] > version, changed
    if not contract.repeatable:
        return
    # A second actor process for the context: writers to one aggregate now race across
    # processes; each conflict is reloaded and retried, so every command lands once.
    async with nats_connection(world.settings, "contract-second") as nc, run_actor(world.settings, nc, bc.name):
        outcomes = await asyncio.gather(*(_send(world, bc, name, body) for _ in range(20)))
    assert [code for code, _ in outcomes] == [None] * 20, outcomes
    assert await _events(world, bc, aid) == stored + 21


@pytest.mark.parametrize("bc", CONTEXTS, ids=lambda c: c.name)
async def test_refusals_are_coded_and_store_nothing(world: System, bc: BoundedContext) -> None:
    contract, aid = _contract(bc), _new_id(bc)
    assert (await _send(world, bc, *contract.create(aid)))[0] is None
    stored = await _events(world, bc, aid)
    name, body, expected = contract.refused(aid)
    code, _ = await _send(world, bc, name, body)
    assert code == expected
    name, body, field = contract.invalid
    code, error = await _send(world, bc, name, body)
    assert (code, error["field"]) == ("validation", field)
    code, _ = await _send(world, bc, contract.change(aid)[0], b'{"not json')
    assert code == "malformed"
    assert await _events(world, bc, aid) == stored


@pytest.mark.parametrize("bc", CONTEXTS, ids=lambda c: c.name)
async def test_a_read_waits_for_the_write_it_names(world: System, bc: BoundedContext) -> None:
    contract, aid = _contract(bc), _new_id(bc)
    query = world.ctx(bc.name).query("get")
    for command in (contract.create(aid), contract.change(aid)):
        code, written = await _send(world, bc, *command)
        assert code is None, written
        view = json.loads(await call(world.nc, query, json.dumps(
            {contract.id_field: aid, "min_seq": written["seq"]}).encode(), timeout=10))
        assert view["version"] == written["version"], (view, written)
