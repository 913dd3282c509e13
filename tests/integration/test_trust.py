"""NATS authentication and per-role permissions, against a nats-server configured the way
`jetsource up` configures its own (infra.auth), with every role running as itself.

The attacks are the ones measured against an open bus: forged events stored and projected (an
unpaid order shipped), a fake responder answering `POST /orders`, a worker appending order
events. Each must be refused by the server and store nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus import parking
from bus.subjects import Parked
from infra import auth
from infra.bootstrap import (
    ensure_streams,
    nats_connection,
    run_actor,
    run_edge,
    run_managers,
    run_projector,
    run_worker,
)
from infra.contexts import declared
from infra.embedded import EmbeddedNats, free_port, nats_server_binary, wait_for_port
from infra.settings import NatsIdentity, Settings
from infra.status import _discover as discover_services
from tests.conftest import eventually, make_settings

PLACE = {"customer_id": "c-1", "currency": "EUR", "lines": [{"sku": "apple", "quantity": 2, "unit_price": 150}]}
NOT_ADMIN = tuple(r for r in auth.roles(Settings(_env_file=None)) if r != auth.ADMIN)


@dataclass
class Secured:
    """A jetsource whose nats-server requires credentials, each role connected as itself."""

    settings: Settings
    url: str
    passwords: dict[str, str]
    admin: Client
    http: aiohttp.ClientSession
    base: str

    async def as_role(self, role: str, password: str | None = None) -> tuple[Client, list[str]]:
        """A raw client with this role's identity and the server errors it receives."""
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(self.url, user=role, password=password or self.passwords[role], error_cb=on_error,
                                allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2,
                                inbox_prefix=f"_INBOX.{role}")
        return nc, errors

    async def messages(self, context: str) -> int:
        stream = self.settings.namespace.upper() + "_" + context.upper()
        return (await self.admin.jetstream().stream_info(stream)).state.messages


@pytest.fixture(scope="module")
async def secured(database_url: str) -> AsyncIterator[Secured]:
    namespace = f"sec{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="jetsource-trust-") as tmp:
        base_settings = make_settings(namespace, "nats://unused:1", database_url, data_dir=Path(tmp), partitions=1,
                                      snapshot_every=3)  # the actors take snapshots as themselves
        passwords = auth.ensure_secrets(base_settings)
        server = EmbeddedNats(Path(tmp), free_port(), free_port(),
                              authorization=auth.server_config_block(base_settings, passwords))
        server.start()
        settings = base_settings.model_copy(update={
            "nats_url": server.url,
            "nats_identities": {role: NatsIdentity(user=role, password=pw) for role, pw in passwords.items()},
        })
        try:
            async with contextlib.AsyncExitStack() as stack:
                admin = await stack.enter_async_context(nats_connection(settings, "admin", auth.ADMIN))
                await ensure_streams(admin, settings)

                async def role(name: str) -> Client:
                    return await stack.enter_async_context(nats_connection(settings, name, name))

                for bc in declared(settings).contexts:  # every context's actor as its own identity
                    await stack.enter_async_context(run_actor(settings, await role(bc.actor_role), bc.name))
                await stack.enter_async_context(run_projector(settings, await role(auth.PROJECTOR)))
                await stack.enter_async_context(run_worker(settings, await role(auth.WORKER), name="w-sec"))
                await stack.enter_async_context(run_managers(settings, lambda pm: role(pm.name)))
                await stack.enter_async_context(run_edge(settings, await role(auth.EDGE)))
                http = await stack.enter_async_context(aiohttp.ClientSession())
                yield Secured(settings, server.url, passwords, admin, http, f"http://127.0.0.1:{settings.http_port}")
        finally:
            server.stop()


async def _discover(nc: Client) -> list[str]:
    return [str(svc["name"]) for svc in await discover_services(nc)]


async def _post(s: Secured, path: str, body: object = None) -> tuple[int, dict]:
    async with s.http.post(s.base + path, json=body) as resp:
        return resp.status, await resp.json()


async def _get(s: Secured, path: str) -> tuple[int, dict]:
    async with s.http.get(s.base + path) as resp:
        return resp.status, await resp.json()


async def test_every_role_runs_as_itself_end_to_end(secured: Secured) -> None:
    status, order = await _post(secured, "/orders", PLACE)
    assert status == 201, order
    oid = order["order_id"]
    assert (await _post(secured, f"/orders/{oid}/confirm"))[0] == 200
    status, paid = await _post(secured, f"/orders/{oid}/pay", {"amount": 300})
    assert status == 200, paid
    # the worker runs the fulfilment task the process manager submitted; its completion ships
    await eventually(lambda: _get(secured, f"/orders/{oid}"), lambda r: r[0] == 200 and r[1]["status"] == "shipped",
                     timeout=30, failure="the paid order was never shipped")
    status, task = await _post(secured, "/tasks", {"type": "echo", "payload": {"x": 1}})
    assert status == 202
    await eventually(lambda: _get(secured, f"/tasks/{task['task_id']}"),
                     lambda r: r[0] == 200 and r[1]["status"] == "completed", timeout=30)
    # The orders actor stored the shipped order's snapshot as itself; the edge reads it.
    status, state = await _get(secured, f"/orders/{oid}/state")
    assert status == 200 and state["state"]["status"] == "shipped", state
    assert state["snapshot"] is not None and state["snapshot"] <= state["version"], state


async def test_forged_snapshots_from_any_other_role_are_refused_and_store_nothing(secured: Secured) -> None:
    ctx = declared(secured.settings).context("orders").context(secured.settings)
    js = secured.admin.jetstream()
    before = (await js.stream_info(ctx.snapshot_stream)).state.messages
    for role in (r for r in NOT_ADMIN if r != auth.ORDERS_ACTOR):
        nc, errors = await secured.as_role(role)
        try:  # a snapshot would be loaded instead of the events: the state of an order, made up
            await nc.publish(ctx.snapshot("forged-snap"), b'{"id":"forged-snap","version":1,"state_version":1,'
                             b'"state":{"status":"paid"}}', headers={"Jetsource-Snapshot-Version": "1"})
            await _refused(nc, errors, "Publish")
        finally:
            await nc.close()
    await asyncio.sleep(0.3)
    assert (await js.stream_info(ctx.snapshot_stream)).state.messages == before


async def test_standard_discovery_sees_every_service_through_the_permissions(secured: Secured) -> None:
    services = [f"{c}_{kind}" for c in ("orders", "tasks", "inventory") for kind in ("actor", "query")]
    found = await eventually(lambda: _discover(secured.admin), lambda names: len(names) >= len(services))
    ns = secured.settings.namespace
    assert sorted(found) == sorted(f"{ns}_{name}" for name in services)


async def test_anonymous_and_wrong_password_connections_are_refused(secured: Secured) -> None:
    with pytest.raises(Exception, match="(?i)authorization"):
        await nats.connect(secured.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    with pytest.raises(Exception, match="(?i)authorization"):
        await secured.as_role(auth.ADMIN, password="guess")


async def _refused(nc: Client, errors: list[str], verb: str) -> None:
    await nc.flush()
    await eventually(lambda: asyncio.sleep(0, list(errors)), lambda e: any(f"permissions violation for {verb.lower()}" in x.lower() for x in e),
                     timeout=5, failure=f"the server never refused the {verb.lower()}")


async def test_forged_events_from_any_other_role_are_refused_and_store_nothing(secured: Secured) -> None:
    orders = secured.settings.namespace + ".orders"
    before_orders, before_tasks = await secured.messages("orders"), await secured.messages("tasks")
    forged = "forged-order"
    for role in (r for r in NOT_ADMIN if r != auth.ORDERS_ACTOR):
        nc, errors = await secured.as_role(role)
        try:
            # an unpaid order made "paid" by hand, with the outbox copy that triggers fulfilment
            await nc.publish(f"{orders}.events.{forged}", json.dumps(
                {"type": "order.placed", "order_id": forged, "customer_id": "x", "currency": "EUR", "lines": []}).encode())
            await nc.publish(f"{orders}.events.{forged}", json.dumps({"type": "order.confirmed", "order_id": forged}).encode())
            await nc.publish(f"{orders}.events.{forged}", json.dumps(
                {"type": "order.paid", "order_id": forged, "amount": 0}).encode())
            await nc.publish(f"{orders}.outbox.paid", json.dumps({"type": "order.paid", "order_id": forged, "amount": 0}).encode())
            await _refused(nc, errors, "Publish")
        finally:
            await nc.close()
    await asyncio.sleep(0.5)
    assert await secured.messages("orders") == before_orders
    assert await secured.messages("tasks") == before_tasks  # no fulfilment task was submitted
    assert (await _get(secured, f"/orders/{forged}"))[0] == 404


async def test_only_the_orders_actor_can_join_the_orders_command_queue(secured: Secured) -> None:
    place = secured.settings.namespace + ".orders.cmd.place"
    fakes: list[tuple[Client, list[str]]] = []
    heard: list[str] = []

    async def answer(msg: Msg) -> None:  # what the fake responder did: a 201 for nothing
        heard.append(msg.subject)
        await msg.respond(b'{"order_id":"fake","status":"placed","total":0,"version":1,"seq":1}')

    for role in (r for r in NOT_ADMIN if r != auth.ORDERS_ACTOR):
        nc, errors = await secured.as_role(role)
        fakes.append((nc, errors))
        await nc.subscribe(place, queue=f"{secured.settings.namespace}.orders.actors", cb=answer)
        await nc.subscribe(place, cb=answer)
        await _refused(nc, errors, "Subscription")
    try:
        placed = await asyncio.gather(*(_post(secured, "/orders", PLACE) for _ in range(50)))
        assert [status for status, _ in placed] == [201] * 50
        assert heard == []
        for _, body in placed:  # every 201 is a real, stored order
            status, history = await _get(secured, f"/orders/{body['order_id']}/events")
            assert status == 200 and history["events"][0]["type"] == "order.placed"
    finally:
        for nc, _ in fakes:
            await nc.close()


@pytest.mark.parametrize(("role", "verb", "subject"), [
    (auth.EDGE, "Publish", "{ns}.tasks.cmd.claim_batch"),       # worker commands are the workers'
    (auth.EDGE, "Publish", "{ns}.tasks.cmd.submit_internal"),   # internal task types are the managers'
    (auth.EDGE, "Publish", "{ns}.orders.cmd.fulfilment_failed"),
    (auth.EDGE, "Publish", "$JS.API.STREAM.DELETE.{NS}_ORDERS"),
    (auth.EDGE, "Publish", "$JS.API.STREAM.PURGE.{NS}_TASKS"),
    (auth.EDGE, "Subscription", "_INBOX.worker.>"),             # another role's replies
    (auth.EDGE, "Subscription", "{ns}.tasks.cmd.submit"),
    (auth.WORKER, "Publish", "{ns}.tasks.events.t1"),
    (auth.WORKER, "Publish", "{ns}.tasks.queue.high"),
    (auth.WORKER, "Publish", "{ns}.tasks.cmd.submit"),
    (auth.WORKER, "Publish", "{ns}.orders.cmd.ship"),
    (auth.WORKER, "Subscription", "{ns}.tasks.cmd.claim"),
    (auth.WORKER, "Publish", "$JS.API.CONSUMER.DELETE.{NS}_TASKS.workers_high"),  # shared: the admin's to define
    (auth.PROJECTOR, "Publish", "{ns}.orders.cmd.place"),
    (auth.PROJECTOR, "Publish", "{ns}.tasks.events.t1"),
    (auth.PROJECTOR, "Publish", "$JS.ACK.{NS}_TASKS.workers_high.1.1.1.1.1"),
    (auth.WORKER, "Publish", "{ns}.parked.fulfilment_manager.{NS}_ORDERS.1"),  # each reader parks as itself
    (auth.PROJECTOR, "Publish", "{ns}.parked.workers.{NS}_TASKS.1"),
    (auth.FULFILMENT, "Publish", "{ns}.tasks.cmd.complete"),
    (auth.FULFILMENT, "Publish", "{ns}.orders.events.o1"),
    (auth.TASKS_ACTOR, "Publish", "{ns}.orders.events.o1"),
    (auth.TASKS_ACTOR, "Subscription", "{ns}.orders.cmd.*"),
    (auth.ORDERS_ACTOR, "Publish", "{ns}.tasks.queue.high"),
    (auth.ORDERS_ACTOR, "Subscription", "{ns}.tasks.cmd.*"),
    # The live configuration is the admin's to change (`jetsource config set`).
    (auth.EDGE, "Publish", "$KV.{NS}_CONFIG.rate_limit_per_s"),
    (auth.WORKER, "Publish", "$KV.{NS}_CONFIG.worker_concurrency"),
    (auth.PROJECTOR, "Publish", "$KV.{NS}_CONFIG.log_level"),
    (auth.FULFILMENT, "Publish", "$JS.API.STREAM.PURGE.KV_{NS}_CONFIG"),
])
async def test_each_role_is_refused_what_its_job_does_not_need(secured: Secured, role: str, verb: str, subject: str) -> None:
    ns = secured.settings.namespace
    subject = subject.format(ns=ns, NS=ns.upper())
    before = (await secured.messages("orders"), await secured.messages("tasks"))
    nc, errors = await secured.as_role(role)
    try:
        if verb == "Publish":
            await nc.publish(subject, b'{"type": "order.placed", "task_id": "t1", "order_id": "o1"}')
        else:
            await nc.subscribe(subject)
        await _refused(nc, errors, verb)
    finally:
        await nc.close()
    assert (await secured.messages("orders"), await secured.messages("tasks")) == before
    await secured.admin.jetstream().stream_info(f"{ns.upper()}_ORDERS")  # still there


@pytest.mark.parametrize("role", NOT_ADMIN)
async def test_every_role_reads_and_follows_the_live_configuration_as_itself(secured: Secured, role: str) -> None:
    from infra import liveconfig

    bucket = f"{secured.settings.namespace.upper()}_CONFIG"
    nc, errors = await secured.as_role(role)
    try:
        heard: list[str] = []

        async def changed(msg: Msg) -> None:
            heard.append(msg.subject)

        await nc.subscribe(f"$KV.{bucket}.>", cb=changed)
        await nc.flush()
        await secured.admin.jetstream().publish(f"$KV.{bucket}.log_level", b'"INFO"')
        revision, data = await liveconfig.read(nc, bucket, "log_level", timeout=5)
        assert (revision > 0, data) == (True, b'"INFO"')

        async def change() -> list[str]:  # again until heard: one core message may be missed on a busy host
            if not heard:
                await secured.admin.jetstream().publish(f"$KV.{bucket}.log_level", b'"INFO"')
                await asyncio.sleep(0.5)
            return heard

        await eventually(change, lambda h: f"$KV.{bucket}.log_level" in h, failure=f"{role} did not hear the change")
        assert errors == []
    finally:
        await nc.close()


async def test_services_answer_the_edges_srv_requests_only_on_inboxes(secured: Secured) -> None:
    # The edge may ask every service's $SRV.STATS (the dashboard), and services may answer
    # wherever a request's reply subject points: aimed at the config bucket, an event subject
    # or a JetStream API subject, the answer must not be sent (so nothing is stored or done).
    ns = secured.settings.namespace
    bucket = f"{ns.upper()}_CONFIG"
    js = secured.admin.jetstream()
    before = ((await js.stream_info(f"KV_{bucket}")).state.messages, await secured.messages("orders"))
    nc, errors = await secured.as_role(auth.EDGE)
    try:
        for reply in (f"$KV.{bucket}.max_inflight", f"{ns}.orders.events.o-srv", f"$JS.API.STREAM.PURGE.KV_{bucket}"):
            await nc.publish("$SRV.STATS", b"", reply=reply)  # the only $SRV request the edge may send
        await nc.flush()
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.STATS", b"", reply=inbox)
        assert json.loads((await sub.next_msg(5)).data)["type"] == "io.nats.micro.v1.stats_response"  # inboxes: yes
        await asyncio.sleep(0.5)  # the refused answers would have been stored by now
    finally:
        await nc.close()
    assert ((await js.stream_info(f"KV_{bucket}")).state.messages, await secured.messages("orders")) == before
    assert errors == []


async def test_the_dashboard_sees_everything_through_the_edges_permissions(secured: Secured) -> None:
    from tests.integration.test_dashboard import _snapshots

    async def snapshot() -> dict:
        return (await _snapshots(secured.http, secured.base + "/dashboard/events", 1))[0]

    snap = await eventually(snapshot, lambda s: len(s["services"]) >= 6, failure="services missing from the dashboard")
    failed = {name: section for name, section in snap.items() if isinstance(section, dict) and "error" in section}
    assert failed == {}, failed  # $SRV.STATS, stream info, the parked stream, the queries: all allowed
    assert all("error" not in st for st in snap["streams"]), snap["streams"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


async def test_a_role_connects_over_mutual_tls_with_its_settings(tmp_path: Path) -> None:
    # A CA, a server certificate for 127.0.0.1 and a client certificate, as an operator would have.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=tmp_path)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=tmp_path)
        (tmp_path / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=tmp_path)
    port = free_port()
    conf = tmp_path / "tls.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'tls {{ cert_file: "{tmp_path}/server.pem", key_file: "{tmp_path}/server.key", '
        f'ca_file: "{tmp_path}/ca.pem", verify: true }}\n'
        'authorization { users = [ { user: "edge", password: "s3cret" } ] }\n'
    )
    server = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 10, server, "nats-server")
        settings = Settings(_env_file=None, nats_url=f"tls://127.0.0.1:{port}", nats_identities={"edge": NatsIdentity(
            user="edge", password="s3cret", tls_ca=tmp_path / "ca.pem", tls_cert=tmp_path / "client.pem",
            tls_key=tmp_path / "client.key")})
        async with nats_connection(settings, "tls-test", auth.EDGE) as nc:
            sub = await nc.subscribe("_INBOX.edge.probe")
            await nc.publish("_INBOX.edge.probe", b"over tls")
            assert (await sub.next_msg(5)).data == b"over tls"
        # without the client certificate the server refuses the handshake
        plain = settings.model_copy(update={"nats_identities": {"edge": NatsIdentity(
            user="edge", password="s3cret", tls_ca=tmp_path / "ca.pem")}})
        with pytest.raises(Exception):
            await nats.connect(plain.resolved_nats_url(), allow_reconnect=False, max_reconnect_attempts=0,
                               connect_timeout=2, **auth.credentials(plain, auth.EDGE).options())
    finally:
        server.kill()
        server.wait()


async def test_replies_a_caller_aims_at_an_event_stream_change_no_state(secured: Secured) -> None:
    """Any client may choose the reply subject of its requests, and JetStream answers there
    whatever the client's permissions: the edge can make the server store a Direct Get answer,
    a stream info or a service reply on `orders.events.<id>`. Nothing folds such messages."""
    ns, NS = secured.settings.namespace, secured.settings.namespace.upper()
    status, order = await _post(secured, "/orders", PLACE)
    assert status == 201
    oid, placed_seq = order["order_id"], order["seq"]
    victim = f"{ns}.orders.events.{oid}"
    js = secured.admin.jetstream()
    before = (await js.stream_info(f"{NS}_ORDERS", subjects_filter=victim)).state.messages
    nc, errors = await secured.as_role(auth.EDGE)
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{NS}_ORDERS", json.dumps({"seq": placed_seq}).encode(), reply=victim)
        await nc.publish(f"$JS.API.DIRECT.GET.{NS}_TASKS", b'{"seq": 999999999}', reply=victim)  # "not found"
        await nc.publish(f"$JS.API.STREAM.INFO.{NS}_ORDERS", b"", reply=victim)
        await nc.publish(f"{ns}.tasks.cmd.cancel", b'{"task_id": "nope"}', reply=victim)  # a service's answer
        await nc.flush()
    finally:
        await nc.close()
    # JetStream stored its answers on the victim's subject (the attack is real) ...
    stored = await eventually(lambda: js.stream_info(f"{NS}_ORDERS", subjects_filter=victim),
                              lambda info: info.state.messages >= before + 2, failure="nothing was stored")
    assert stored.state.messages >= before + 2
    await asyncio.sleep(0.3)
    foreign = (await js.stream_info(f"{NS}_ORDERS", subjects_filter=victim)).state.messages - before
    # Stored: the TASKS Direct Get answer (an empty "not found") and the stream info.
    # Not stored: the ORDERS Direct Get copy of the order's own event (the server refuses a
    # stream's answer into itself) and the tasks actor's answer (it does not reply off-inbox).
    assert foreign == 2, foreign
    # the order still takes commands, its history and read model show only its own events
    assert (await _post(secured, f"/orders/{oid}/confirm"))[0] == 200
    status, paid = await _post(secured, f"/orders/{oid}/pay", {"amount": 300})
    assert status == 200 and paid["status"] == "paid"
    status, history = await _get(secured, f"/orders/{oid}/events")
    types = [e["type"] for e in history["events"]]
    assert types[:4] == ["order.placed", "order.confirmed", "order.reserved", "order.paid"]
    assert set(types[4:]) <= {"order.shipped"}
    view = await eventually(lambda: _get(secured, f"/orders/{oid}"), lambda r: r[1].get("version", 0) >= paid["version"])
    assert view[1]["status"] in ("paid", "shipped")
    parked = await eventually(lambda: parking.unresolved(secured.admin, Parked(ns), "orders_projection"),
                              lambda found: len([p for p in found if p.subject == victim]) == 2)
    assert all("not an appended event" in p.error for p in parked if p.subject == victim)
    # the operator's replay shows what is stored, flagged, without a traceback
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETSOURCE_")} | {
        "JETSOURCE_NATS_URL": secured.url, "JETSOURCE_NATS_USER": auth.ADMIN,
        "JETSOURCE_NATS_PASSWORD": secured.passwords[auth.ADMIN], "JETSOURCE_NAMESPACE": ns}
    replay = subprocess.run([sys.executable, "-m", "infra.cli", "replay", "orders", oid], env=env,
                            capture_output=True, text=True, timeout=60)
    assert replay.returncode == 0, replay.stderr
    lines = [json.loads(line) for line in replay.stdout.splitlines()]
    assert [line.get("appended", True) for line in lines].count(False) == 2
    assert [line["event"]["type"] for line in lines if line.get("appended", True)][:4] == [
        "order.placed", "order.confirmed", "order.reserved", "order.paid"]
