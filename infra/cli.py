"""The `jetsource` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from infra.settings import Settings

if TYPE_CHECKING:
    from nats.aio.client import Client

log = logging.getLogger("jetsource")


class UnreachableError(Exception):
    """A one-shot command could not reach NATS in time: one line on stderr, exit 1."""


async def _connect_once(settings: Settings, name: str, timeout: float) -> Client:
    """The CLI's connection: one attempt within `timeout`, never the roles' reconnect-forever."""
    from nats.errors import Error as NatsError

    from bus.connection import connect
    from infra.auth import ADMIN, credentials

    url = settings.resolved_nats_url()
    try:
        return await connect(url, name, connect_timeout=timeout, once=True, credentials=credentials(settings, ADMIN))
    except NatsError as exc:
        if "authorization" in str(exc).lower():
            raise UnreachableError(f"NATS at {url} refused the admin identity (wrong or missing credentials: "
                                   "JETSOURCE_NATS_* settings, or run from the directory of `jetsource up`'s data)"
                                   ) from None
        raise UnreachableError(f"cannot reach NATS at {url} within {timeout:g}s") from None
    except (OSError, TimeoutError):
        raise UnreachableError(f"cannot reach NATS at {url} within {timeout:g}s") from None


def _setup_logging(settings: Settings, role: str) -> None:
    from infra.logs import setup

    setup(settings.log_level, settings.log_format, role)


def _run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _role(
    settings: Settings, name: str, role: str, parts: Callable[[Any, contextlib.AsyncExitStack, Any], Awaitable[None]]
) -> int:
    """Run one role's parts on a connection with that role's NATS identity, following the live
    configuration (`infra.liveconfig`: the log level, and what the parts register). Roles do not
    create streams (their identities may not): `jetsource prepare` or `jetsource up` does, as admin."""
    _setup_logging(settings, name)

    async def main() -> int:
        from infra.bootstrap import nats_connection
        from infra.liveconfig import LiveConfig, apply_log_level

        if settings.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(settings.metrics_port, addr=settings.http_host)
        async with contextlib.AsyncExitStack() as stack:
            nc = await stack.enter_async_context(nats_connection(settings, f"jetsource-{name}", role))
            live = await stack.enter_async_context(LiveConfig(nc, settings).running())  # before any work
            live.on("log_level", apply_log_level)
            await parts(nc, stack, live)
            # Everything alive now (modules, clients) lives as long as the process: keep it
            # out of the cyclic GC's full collections, which otherwise rescan it every time.
            gc.freeze()
            # Requests allocate many short-lived, acyclic objects (messages are untracked
            # structs): collect the young generation every 20k allocations, not every 700.
            gc.set_threshold(20_000, 50, 1000)
            log.info("%s ready", name)
            await _until_signalled()
            log.info("%s draining", name)
        return 0

    return _run(main)


def cmd_actor(settings: Settings, args: argparse.Namespace) -> int:
    from infra.bootstrap import run_actor
    from infra.contexts import declared

    async def parts(nc: Any, stack: contextlib.AsyncExitStack, live: Any) -> None:
        await stack.enter_async_context(run_actor(settings, nc, args.context))

    return _role(settings, f"actor-{args.context}", declared(settings).context(args.context).actor_role, parts)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from infra import auth
    from infra.bootstrap import run_worker

    if args.concurrency:
        settings = settings.model_copy(update={"worker_concurrency": args.concurrency})

    async def parts(nc: Any, stack: contextlib.AsyncExitStack, live: Any) -> None:
        await stack.enter_async_context(run_worker(settings, nc, live=live))

    return _role(settings, "worker", auth.WORKER, parts)


def cmd_managers(settings: Settings, args: argparse.Namespace) -> int:
    """Every declared process manager (or those named), each on a connection of its own identity."""
    from infra.bootstrap import nats_connection, run_managers
    from infra.contexts import declared

    names = [pm.name for pm in declared(settings).managers]
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        print(f"jetsource: no process manager {', '.join(unknown)}; declared: {', '.join(names)}", file=sys.stderr)
        return 2

    async def parts(nc: Any, stack: contextlib.AsyncExitStack, live: Any) -> None:
        async def connection(pm: Any) -> Any:
            return await stack.enter_async_context(nats_connection(settings, f"jetsource-{pm.name}", pm.name))

        await stack.enter_async_context(run_managers(settings, connection, args.names))

    # The process's own connection (admin-free: the first manager's identity) only hosts metrics.
    first = args.names[0] if args.names else names[0]
    return _role(settings, "managers", first, parts)


def cmd_projector(settings: Settings, args: argparse.Namespace) -> int:
    from infra import auth
    from infra.bootstrap import run_projector

    async def parts(nc: Any, stack: contextlib.AsyncExitStack, live: Any) -> None:
        await stack.enter_async_context(run_projector(settings, nc, live))

    return _role(settings, "projector", auth.PROJECTOR, parts)


def cmd_edge(settings: Settings, args: argparse.Namespace) -> int:
    from infra import auth
    from infra.bootstrap import run_edge

    async def parts(nc: Any, stack: contextlib.AsyncExitStack, live: Any) -> None:
        await stack.enter_async_context(run_edge(settings, nc, live))

    return _role(settings, "edge", auth.EDGE, parts)


def cmd_prepare(settings: Settings, args: argparse.Namespace) -> int:
    _setup_logging(settings, "prepare")

    from infra.bootstrap import PartitionsMismatch, prepare

    async def main() -> int:
        try:
            prepared = await prepare(settings)
        except PartitionsMismatch as exc:
            print(f"jetsource: {exc}", file=sys.stderr)
            return 2
        print(f"jetsource: streams ({prepared.partitions} partition(s) per context), consumers and read-model "
              "schema are in place")
        return 0

    return _run(main)


def cmd_nats_config(settings: Settings, args: argparse.Namespace) -> int:
    from infra import auth

    print(auth.server_config_block(settings, auth.ensure_secrets(settings)), end="")
    return 0


def cmd_docs(settings: Settings, args: argparse.Namespace) -> int:
    """Print an API description as the edge serves it: no server needed."""
    if args.document == "asyncapi":
        from infra.asyncapi import asyncapi_document

        document = asyncapi_document(settings)
    else:
        from http_edge.openapi import openapi_document
        from infra.contexts import declared

        document = openapi_document([bc.openapi for bc in declared(settings).contexts if bc.openapi is not None])
    sys.stdout.write(document.decode() + "\n")
    return 0


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    _setup_logging(settings, "up")
    from infra.supervisor import up

    overrides: dict[str, Any] = {}
    if args.cluster:
        if settings.nats_url:
            print("jetsource: --cluster starts embedded nodes; JETSOURCE_NATS_URL names an external server",
                  file=sys.stderr)
            return 2
        overrides["nats_cluster"] = args.cluster
    if args.partitions:
        overrides["partitions"] = args.partitions
    if overrides:
        settings = Settings(**overrides)  # the environment's settings, and these
    return up(settings)


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    from bus import subjects as h
    from bus.client import with_deadline
    from bus.connection import request

    async def main() -> int:
        headers = dict(kv.split("=", 1) for kv in args.header)
        nc = await _connect_once(settings, "jetsource-send", args.timeout)
        try:
            try:
                msg = await request(nc, args.subject, args.json.encode(), timeout=args.timeout,
                                    headers=with_deadline(headers, args.timeout))
            except Exception as exc:  # noqa: BLE001 - the CLI's one catch-all: print, exit 1
                print(json.dumps({"error": {"code": "unavailable", "message": f"{type(exc).__name__}: {exc}"}}))
                return 1
            print(msg.data.decode())
            return 1 if msg.headers and h.SERVICE_ERROR_CODE in msg.headers else 0
        finally:
            await nc.close()

    return _run(main)


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    import msgspec

    from actors.upcasting import EventCodec
    from bus import subjects as h
    from bus.eventstore import PartitionedStore, appended
    from infra.bootstrap import context
    from infra.contexts import declared

    async def main() -> int:
        ctx = context(settings, args.context)
        nc = await _connect_once(settings, "jetsource-replay", args.timeout)
        try:
            store = PartitionedStore.open(nc, ctx)
            codec = None if args.stored else EventCodec.of(declared(settings).context(args.context)
                                                           .spec(settings).event_type)
            subject = ctx.events(args.aggregate_id) if args.aggregate_id else ctx.events_wildcard
            count = 0
            async for e in store.read(subject, from_seq=args.from_seq, since=args.since, follow=args.follow):
                data = e.data
                if codec is not None and appended(e.headers):
                    with contextlib.suppress(msgspec.DecodeError):  # what no reader can decode is shown as stored
                        data = codec.current_bytes(data)
                try:
                    event = json.loads(data)
                except ValueError:  # shown as it is stored, never a traceback
                    event = None
                out = {
                    "seq": e.seq, "stream": store.of(e.subject).stream, "subject": e.subject,
                    "time": e.headers.get(h.EV_TIME, e.time),
                    "event": event, "command_id": e.headers.get(h.EV_COMMAND_ID),
                    "trace_id": e.headers.get(h.EV_TRACE_ID),
                }
                if not appended(e.headers):
                    out["appended"] = False  # stored there, but not by an actor (see Security)
                if event is None:
                    out["raw"] = e.data.decode("utf-8", "replace")
                print(json.dumps(out), flush=True)
                count += 1
            if count == 0 and args.aggregate_id:
                print(f"no events for {args.context} {args.aggregate_id}", file=sys.stderr)
                return 1
            return 0
        finally:
            await nc.close()

    return _run(main)


def cmd_state(settings: Settings, args: argparse.Namespace) -> int:
    from actors.errors import JetsourceError
    from actors.history import state_at
    from actors.snapshots import Snapshots
    from bus.codec import encode
    from bus.eventstore import PartitionedStore
    from infra.bootstrap import context
    from infra.contexts import declared

    async def main() -> int:
        ctx = context(settings, args.context)
        spec = declared(settings).context(args.context).spec(settings)
        nc = await _connect_once(settings, "jetsource-state", args.timeout)
        try:
            found = await state_at(PartitionedStore.open(nc, ctx), spec, args.aggregate_id, args.context,
                                   at_version=args.at_version, at_time=args.at_time, snapshots=Snapshots.of(nc, spec))
        except JetsourceError as exc:
            print(f"jetsource: {exc.message}", file=sys.stderr)
            return 1
        finally:
            await nc.close()
        print(json.dumps({"id": args.aggregate_id, "version": found.version, "time": found.time,
                          "snapshot": found.snapshot, "state": json.loads(encode(found.state))}))
        return 0

    return _run(main)


def cmd_snapshots(settings: Settings, args: argparse.Namespace) -> int:
    from actors.runtime import Actor
    from bus.eventstore import PartitionedStore, direct_last
    from infra.bootstrap import context
    from infra.contexts import declared

    async def main() -> int:
        ctx = context(settings, args.context)
        spec = declared(settings).context(args.context).spec(settings)
        nc = await _connect_once(settings, "jetsource-snapshots", args.timeout)
        try:
            actor = Actor(nc, PartitionedStore.open(nc, ctx), spec)
            snapshots = actor.snapshots
            if args.snapshot_action == "take":
                for aggregate_id in args.ids:
                    version = await actor.snapshot_now(aggregate_id)
                    if version == 0:
                        print(f"jetsource: {args.context} {aggregate_id} has no events", file=sys.stderr)
                        return 1
                    print(json.dumps({"id": aggregate_id, "version": version}))
                return 0
            if args.snapshot_action == "drop":
                await nc.jetstream().purge_stream(ctx.snapshot_stream)
                print(f"dropped every snapshot of {args.context}: the next loads fold the events (and take new ones)")
                return 0
            if not args.ids:
                info = await nc.jetstream().stream_info(ctx.snapshot_stream)
                print(json.dumps({"context": args.context, "stream": ctx.snapshot_stream,
                                  "snapshots": info.state.messages, "bytes": info.state.bytes,
                                  "every": spec.snapshot_every, "state_version": spec.state_version}))
                return 0
            code = 0
            for aggregate_id in args.ids:
                msg = await direct_last(nc, ctx.snapshot_stream, ctx.snapshot(aggregate_id), timeout=args.timeout)
                if msg is None:
                    print(f"jetsource: {args.context} {aggregate_id} has no snapshot", file=sys.stderr)
                    code = 1
                    continue
                usable = snapshots.decode(aggregate_id, msg.data, msg.headers or {}) if snapshots else None
                body = json.loads(msg.data)
                print(json.dumps({"id": aggregate_id, "version": body.get("version"),
                                  "state_version": body.get("state_version"), "time": body.get("time"),
                                  "usable": usable is not None, "commands": len(body.get("commands") or {}),
                                  "bytes": len(msg.data), "state": body.get("state")}))
            return code
        finally:
            await nc.close()

    return _run(main)


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    """`jetsource config list | get KEY | set KEY VALUE | unset KEY`: the live configuration."""
    from infra import liveconfig

    if args.config_action in ("get", "set", "unset") and args.key not in liveconfig.LIVE:
        print(f"jetsource: {args.key!r} is not a live setting; live settings: {', '.join(liveconfig.LIVE)}",
              file=sys.stderr)
        return 2
    value = None
    if args.config_action == "set":
        try:
            value = liveconfig.parse(args.key, args.value)
        except liveconfig.BadValue as exc:
            print(f"jetsource: {exc}; nothing was changed", file=sys.stderr)
            return 2

    async def main() -> int:
        from nats.errors import Error as NatsError

        from bus.errors import JetsourceError
        from bus.streams import config_bucket

        bucket = config_bucket(settings.namespace)
        nc = await _connect_once(settings, "jetsource-config", args.timeout)
        try:
            js = nc.jetstream()
            if args.config_action == "set":
                ack = await js.publish(liveconfig.key_subject(bucket, args.key), liveconfig.encode(value),
                                       stream=f"KV_{bucket}", timeout=args.timeout)
                print(json.dumps({"key": args.key, "value": value, "source": "kv", "revision": ack.seq}))
                return 0
            if args.config_action == "unset":
                ack = await js.publish(liveconfig.key_subject(bucket, args.key), b"", stream=f"KV_{bucket}",
                                       headers={"KV-Operation": "DEL"}, timeout=args.timeout)
                fallback, source = liveconfig.base_value(settings, args.key)
                print(json.dumps({"key": args.key, "removed": True, "revision": ack.seq,
                                  "value": fallback, "source": source}))
                return 0
            keys = [args.key] if args.config_action == "get" else list(liveconfig.LIVE)
            for key in keys:
                revision, data = await liveconfig.read(nc, bucket, key, timeout=args.timeout)
                line: dict[str, Any] = {"key": key}
                try:
                    current, source = liveconfig.effective(settings, key, data)
                except liveconfig.BadValue as exc:
                    line["invalid"] = str(exc)  # running roles keep what they had
                    current, source = liveconfig.effective(settings, key, None)
                line.update(value=current, source=source, **({"revision": revision} if source == "kv" else {}))
                line.update(applies_to=liveconfig.LIVE[key].roles, description=liveconfig.LIVE[key].description)
                print(json.dumps(line))
            return 0
        except JetsourceError as exc:
            print(f"jetsource: {exc.message}", file=sys.stderr)
            return 1
        except NatsError as exc:
            print(f"jetsource: the config bucket {bucket} did not answer ({exc or type(exc).__name__}); "
                  "`jetsource prepare` creates it", file=sys.stderr)
            return 1
        finally:
            await nc.close()

    return _run(main)


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from infra.status import status

    async def main() -> int:
        nc = await _connect_once(settings, "jetsource-status", args.timeout)
        try:
            return await status(settings, nc)
        finally:
            await nc.close()

    return _run(main)


def cmd_rebuild(settings: Settings, args: argparse.Namespace) -> int:
    from infra.status import rebuild

    _setup_logging(settings, "rebuild")
    return _run(lambda: rebuild(settings, args.name or args.only, keep=args.keep, require_parity=args.require_parity))


def cmd_parked(settings: Settings, args: argparse.Namespace) -> int:
    from infra.parked import command

    action = args.parked_action or "list"
    target = None
    if action != "list":
        if len(args.target) == 3 and not args.all:
            target = (args.target[0], args.target[1], int(args.target[2]))
        elif args.target or not args.all:
            print("name one parked event (READER STREAM SEQ) or pass --all", file=sys.stderr)
            return 2
    return _run(lambda: command(settings, action, everything=args.all, reader=args.reader, target=target))


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    from infra.bench import bench

    return _run(lambda: bench(settings, args))


def _iso_datetime(text: str) -> datetime:
    """An ISO 8601 time; without a zone, UTC."""
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return at if at.tzinfo else at.replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO datetime: {text!r} (e.g. 2026-01-01T00:00:00+00:00)") from None


def _sequence(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a stream sequence is an integer >= 1, not {text!r}")
    return value


def _nodes(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value < 3 or value % 2 == 0:
        raise argparse.ArgumentTypeError(f"an odd number of nodes, at least 3, not {text!r}")
    return value


def _partition_count(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(f"a partition count from 1 to 8, not {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"seconds in (0, 3600], not {text!r}")
    return value


def parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    from infra.contexts import declared

    found = declared(settings or Settings())
    contexts = found.names()
    read_models = [c.read_model.projection().name for c in found.contexts if c.read_model is not None]
    p = argparse.ArgumentParser(prog="jetsource", description="Event-sourced services on NATS JetStream.")
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="run everything (embedded nats-server and PostgreSQL by default)")
    u.add_argument("--cluster", type=_nodes, nargs="?", const=3, default=0, metavar="N",
                   help="an embedded cluster of N nats-server nodes (odd; 3 when no N), R(N) streams")
    u.add_argument("--partitions", type=_partition_count, default=0, metavar="K",
                   help="spread each context's events over K streams (when they are created; "
                        "JETSOURCE_PARTITIONS); an existing data directory keeps its count")
    u.set_defaults(fn=cmd_up)
    a = sub.add_parser("actor", help="run one context's actor (scale out: run more)")
    a.add_argument("context", choices=contexts)
    a.set_defaults(fn=cmd_actor)
    m = sub.add_parser("managers", help="run the process managers (the order saga, fulfilment), each as itself")
    m.add_argument("names", nargs="*", metavar="NAME", help=f"only these: {', '.join(pm.name for pm in found.managers)}")
    m.set_defaults(fn=cmd_managers)
    w = sub.add_parser("worker", help="run task handlers (scale out: run more)")
    w.add_argument("--concurrency", type=int, help="tasks at once (default: JETSOURCE_WORKER_CONCURRENCY)")
    w.set_defaults(fn=cmd_worker)
    sub.add_parser("projector", help="run the projections and the query endpoints").set_defaults(fn=cmd_projector)
    sub.add_parser("edge", help="run the HTTP edge").set_defaults(fn=cmd_edge)
    sub.add_parser("prepare", help="create streams, consumers and the read-model schema (admin; `up` does it too)"
                   ).set_defaults(fn=cmd_prepare)
    sub.add_parser("nats-config", help="print the nats-server `authorization` block: every role's user and "
                                       "permissions (passwords from the data directory)").set_defaults(fn=cmd_nats_config)
    d = sub.add_parser("docs", help="print an API description (JSON): asyncapi, the NATS API (as /asyncapi.json); "
                                    "openapi, the HTTP routes (as /openapi.json)")
    d.add_argument("document", choices=["asyncapi", "openapi"])
    d.set_defaults(fn=cmd_docs)
    s = sub.add_parser("send", help="send a command or query and print the reply")
    s.add_argument("subject")
    s.add_argument("json", nargs="?", default="{}")
    s.add_argument("-H", "--header", action="append", default=[], help="K=V, e.g. Idempotency-Key=abc")
    s.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to connect, and then for the reply")
    s.set_defaults(fn=cmd_send)
    r = sub.add_parser("replay", help="print an aggregate's or a stream's events")
    r.add_argument("context", choices=contexts)
    r.add_argument("aggregate_id", nargs="?")
    r.add_argument("--from-seq", type=_sequence)
    r.add_argument("--since", type=_iso_datetime, help="ISO time, e.g. 2026-01-01T00:00:00+00:00")
    r.add_argument("--follow", "-f", action="store_true")
    r.add_argument("--stored", action="store_true",
                   help="each event as stored (default: upcast to its type's current version)")
    r.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to connect to NATS")
    r.set_defaults(fn=cmd_replay)
    sa = sub.add_parser("state", help="an aggregate's state folded from its stream, now or at a version or time")
    sa.add_argument("context", choices=contexts)
    sa.add_argument("aggregate_id")
    sa.add_argument("--at-version", type=_sequence, metavar="N", help="as of this version (a stream sequence)")
    sa.add_argument("--at-time", type=_iso_datetime, metavar="ISO", help="as of this time, e.g. 2026-01-01T12:00:00Z")
    sa.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to connect to NATS")
    sa.set_defaults(fn=cmd_state)
    sn = sub.add_parser("snapshots", help="aggregate snapshots: show them, take them, drop them")
    sns = sn.add_subparsers(dest="snapshot_action", required=True)
    for name, what in (("show", "a context's snapshots (count, bytes, policy), or these aggregates' (JSON lines)"),
                       ("take", "fold these aggregates from their streams and store their snapshots now"),
                       ("drop", "delete every snapshot of a context (loads then fold the events)")):
        sna = sns.add_parser(name, help=what)
        sna.add_argument("context", choices=contexts)
        if name != "drop":
            sna.add_argument("ids", nargs="*" if name == "show" else "+", metavar="ID")
        sna.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to connect to NATS")
        sna.set_defaults(fn=cmd_snapshots, ids=[])
    cf = sub.add_parser("config", help="the live configuration (a NATS KV bucket every role follows): "
                                       "list, get, set, unset")
    cfs = cf.add_subparsers(dest="config_action", required=True)
    for name, what in (("list", "every live setting: its value, where it comes from, what applies it (JSON lines)"),
                       ("get", "one live setting"),
                       ("set", "change a live setting for every process (validated: a bad value changes nothing)"),
                       ("unset", "remove a live setting: every process goes back to its environment's value")):
        cfa = cfs.add_parser(name, help=what)
        if name != "list":
            cfa.add_argument("key", metavar="KEY")
        if name == "set":
            cfa.add_argument("value", metavar="VALUE", help="JSON, or a bare string (e.g. 64, 0.5, DEBUG)")
        cfa.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to connect to NATS")
        cfa.set_defaults(fn=cmd_config)
    st = sub.add_parser("status", help="services, streams and projection lag")
    st.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to connect to NATS")
    st.set_defaults(fn=cmd_status)
    pr = sub.add_parser("projections", help="projection maintenance")
    prs = pr.add_subparsers(dest="action", required=True)
    rb = prs.add_parser("rebuild", help="rebuild read models from the streams, blue/green: a copy is built "
                                        "aside while the live one serves, compared, then swapped in")
    rb.add_argument("name", nargs="?", choices=read_models, help="only this read model (default: every one)")
    rb.add_argument("--only", choices=read_models, help=argparse.SUPPRESS)  # the name's older spelling
    rb.add_argument("--keep", action="store_true", help="keep the old tables (schema <schema>__<name>_old)")
    rb.add_argument("--require-parity", action="store_true",
                    help="swap only if the copy equals the live read model (exit 1 and keep it otherwise)")
    rb.set_defaults(fn=cmd_rebuild)
    pk = prs.add_parser("parked", help="events a reader could not decode or apply: list (JSON lines), retry, skip")
    pk.add_argument("--reader", help="only this reader's, e.g. orders_projection, fulfilment_manager")
    pk.set_defaults(fn=cmd_parked, parked_action=None, all=False, target=[])
    pks = pk.add_subparsers(dest="parked_action")
    for name, what in (("retry", "apply again with the current code; resolved ones are deleted"),
                       ("skip", "delete without applying")):
        pka = pks.add_parser(name, help=what)
        pka.add_argument("target", nargs="*", metavar="READER STREAM SEQ", help="one parked event")
        pka.add_argument("--all", action="store_true", help="every parked event (of --reader, when given)")
        pka.add_argument("--reader", default=argparse.SUPPRESS, help="with --all: only this reader's")
    b = sub.add_parser("bench", help="load the actors (NATS) and the edge (HTTP); report rates and latency")
    b.add_argument("--count", type=int, default=20000)
    b.add_argument("--inflight", type=int, default=64)
    b.add_argument("--only", choices=["ceilings", "nats", "saga", "http", "tasks", "read", "rebuild"], action="append",
                   help="these phases only (default: all but rebuild, which runs when named)")
    b.add_argument("--rebuild-events", type=int, default=1_000_000, metavar="N",
                   help="order events the rebuild phase writes before it rebuilds the orders read model")
    b.add_argument("--partitions", type=_partition_count, default=0, metavar="K",
                   help="the system it starts spreads each context over K streams")
    b.add_argument("--cluster", type=_nodes, nargs="?", const=3, default=0, metavar="N",
                   help="the system it starts runs on an embedded cluster of N nodes (R(N) streams)")
    b.add_argument("--dashboard", action="store_true",
                   help="keep one dashboard page's event stream open while the phases run (its cost is in the figures)")
    b.add_argument("--log-format", choices=["text", "json"],
                   help="the log format of the system the bench starts (JETSOURCE_LOG_FORMAT)")
    b.add_argument("--pid", type=int, help="a running `jetsource up`'s pid: task phases report CPU per task "
                                           "for each of its processes (a system the bench starts reports it anyway)")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    from infra.bootstrap import PartitionsMismatch, with_recorded_partitions

    settings = Settings()
    args = parser(settings).parse_args(argv)
    try:
        if args.fn is not cmd_up:  # `up` settles it itself, with its --partitions
            settings = with_recorded_partitions(settings)
        return int(args.fn(settings, args))
    except PartitionsMismatch as exc:
        print(f"jetsource: {exc}", file=sys.stderr)
        return 2
    except UnreachableError as exc:
        print(f"jetsource: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
