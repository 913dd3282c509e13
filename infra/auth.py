"""Who may do what on NATS: one identity per role, and the permissions of each (deny wins).

The embedded server is started with these users (`jetsource up` creates a random password per
role in `<data dir>/secrets/<role>.password`, mode 0600); for an external server or cluster,
`jetsource nats-config` prints the same `authorization` block to put in its configuration.
Each role connects with its own identity (`credentials`), and receives replies only on its own
inbox prefix (`_INBOX.<role>.>`), so no role can read another's replies.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from bus.connection import Credentials
from bus.streams import config_bucket
from bus.subjects import Context, Parked
from infra.contexts import declared
from infra.embedded import write_private
from infra.settings import NatsIdentity, Settings

ADMIN = "admin"
EDGE = "edge"
PROJECTOR = "projector"
ORDERS_ACTOR = "orders_actor"
TASKS_ACTOR = "tasks_actor"
WORKER = "worker"
FULFILMENT = "fulfilment"


def roles(settings: Settings) -> tuple[str, ...]:
    """Every identity of the declared set: admin, edge, projector, each context's actor and
    extra roles (workers), each process manager."""
    found = declared(settings)
    out = [ADMIN, EDGE, PROJECTOR]
    for bc in found.contexts:
        out += [bc.actor_role, *(r.name for r in bc.roles)]
    out += [pm.name for pm in found.managers]
    return tuple(out)


API = "$JS.API"


def secrets_dir(settings: Settings) -> Path:
    return settings.data_dir / "secrets"


def ensure_secrets(settings: Settings) -> dict[str, str]:
    """Each role's password, created (random, 256 bits) on first use; files are mode 0600."""
    return {role: _secret(settings, role) for role in roles(settings)}


ROUTE = "cluster_route"  # not a role: the password the embedded cluster's nodes route with


def route_password(settings: Settings) -> str:
    """The embedded cluster's route password, created like the roles' on first use."""
    return _secret(settings, ROUTE)


def _secret(settings: Settings, name: str) -> str:
    folder = secrets_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / f"{name}.password"
    password = path.read_text().strip() if path.exists() else ""
    if len(password) < 32:  # missing, or cut short: a weak (even empty) password is worse than a new one
        password = secrets.token_urlsafe(32)
        write_private(path, password)
    os.chmod(path, 0o600)
    return password


def credentials(settings: Settings, role: str) -> Credentials:
    """The identity `role` connects with: its entry in `nats_identities`, else the generic
    `nats_*` settings, else (embedded server) its password from the data directory, else none."""
    inbox = f"_INBOX.{role}"
    chosen = settings.nats_identities.get(role)
    if chosen is None and settings.generic_nats_identity.given():
        chosen = settings.generic_nats_identity
    if chosen is None and settings.nats_embedded:
        path = secrets_dir(settings) / f"{role}.password"
        if path.exists():
            chosen = NatsIdentity(user=role, password=path.read_text().strip())
    if chosen is None:
        chosen = NatsIdentity()
    tls = chosen if chosen.tls_ca or chosen.tls_cert else settings.generic_nats_identity
    return Credentials(
        user=chosen.user, password=chosen.password, creds_file=_path(chosen.creds), nkey_seed_file=_path(chosen.nkey_seed),
        tls_ca=_path(tls.tls_ca), tls_cert=_path(tls.tls_cert), tls_key=_path(tls.tls_key), inbox=inbox,
    )


def _path(value: Path | None) -> str | None:
    return str(value) if value else None


def consumer_api(stream: str, durable: str, *, manage: bool = True) -> list[str]:
    """What a reader needs of one durable consumer: pull from it and ack what it was given; to
    `manage` it, also (re)create, look at and delete it (a projection re-creates its consumer at
    its checkpoint; workers share consumers the admin creates, which no worker may redefine)."""
    use = [f"{API}.CONSUMER.MSG.NEXT.{stream}.{durable}", f"$JS.ACK.{stream}.{durable}.>"]
    if not manage:
        return use
    return [*use, f"{API}.CONSUMER.CREATE.{stream}.{durable}", f"{API}.CONSUMER.CREATE.{stream}.{durable}.>",
            f"{API}.CONSUMER.DURABLE.CREATE.{stream}.{durable}", f"{API}.CONSUMER.INFO.{stream}.{durable}",
            f"{API}.CONSUMER.DELETE.{stream}.{durable}"]


def stores(settings: Settings) -> list[str]:
    """Every subject an event stream stores: only actors publish there (each to its own)."""
    out = []
    for bc in declared(settings).contexts:
        out += _stores(bc.context(settings), bc.work_queue)
    return out


def _stores(ctx: Context, work_queue: bool) -> list[str]:
    """What a context's actor alone may write: its events, outbox, work items and snapshots."""
    return [ctx.events_wildcard, ctx.outbox_wildcard, *([ctx.queue_wildcard] if work_queue else []),
            ctx.snapshots_wildcard]


def _read(ctx: Context) -> list[str]:
    """Direct Get and stream info on every stream (partition) of a context, and its snapshots."""
    return [api for stream in (*ctx.streams, ctx.snapshot_stream)
            for api in (f"{API}.DIRECT.GET.{stream}", f"{API}.STREAM.INFO.{stream}")]


# Stream and server administration: the admin's alone.
ADMIN_API = [*(f"{API}.STREAM.{op}.>" for op in ("CREATE", "UPDATE", "DELETE", "PURGE", "MSG.DELETE", "SNAPSHOT",
                                                   "RESTORE", "PEER.REMOVE", "LEADER.STEPDOWN")),
             f"{API}.ACCOUNT.>", f"{API}.META.>", f"{API}.SERVER.>"]


def permissions(settings: Settings, role: str) -> dict[str, Any]:
    """The nats-server permissions of one role. Everything not allowed is denied; the explicit
    denies make the rules that matter most hold even if an allow is widened by mistake. Every
    role may read and follow the live configuration; only the admin may change it."""
    perms = _permissions(settings, role)
    if role == ADMIN:
        return perms
    bucket = config_bucket(settings.namespace)
    publish, subscribe = perms.setdefault("publish", {}), perms.setdefault("subscribe", {})
    publish["allow"] = [*publish.get("allow", []), f"{API}.DIRECT.GET.KV_{bucket}"]
    publish["deny"] = [*publish.get("deny", []), f"$KV.{bucket}.>"]
    subscribe["allow"] = [*subscribe.get("allow", []), f"$KV.{bucket}.>"]
    return perms


def _permissions(settings: Settings, role: str) -> dict[str, Any]:
    found = declared(settings)
    contexts = [(bc, bc.context(settings)) for bc in found.contexts]
    parked = Parked(settings.namespace)
    inbox = [f"_INBOX.{role}.>"]
    all_stores = stores(settings)
    commands = [c.command(">") for _, c in contexts] + [c.query(">") for _, c in contexts]
    if role == ADMIN:
        return {}  # no permissions block: everything, without the server checking every message
    if role == EDGE:
        # The dashboard: every service's $SRV.STATS, and how many events each reader parked.
        allow = ["$SRV.STATS", f"{API}.STREAM.INFO.{parked.stream}"]
        deny = [*all_stores, *ADMIN_API, f"{API}.CONSUMER.>"]
        for bc, ctx in contexts:
            allow += [*(ctx.command(n) for n in bc.public_edge_commands(settings)), ctx.query("*"), *_read(ctx)]
            deny += [*(ctx.command(n) for n in bc.internal_commands(settings)), *bc.actor_publishes(ctx)]
        return {"publish": {"allow": allow, "deny": deny}, "subscribe": {"allow": inbox, "deny": commands}}
    if role == PROJECTOR:
        allow, sub = [], ["$SRV.>", *inbox]
        models = [(bc, ctx) for bc, ctx in contexts if bc.read_model is not None]
        for bc, ctx in models:
            durable = ctx.consumer(bc.read_model.projection.name)  # type: ignore[union-attr]
            # each reader parks under its own name only (an operator's retry acts on it); a
            # blue/green rebuild's copy reads by Direct Get
            allow += [*(api for part in ctx.parts for api in consumer_api(part.stream, durable)), *_read(ctx),
                      parked.reader_wildcard(durable)]
            sub.append(f"{ctx.query('*')} {ctx.queue_group}.query")
        return {
            "publish": {"allow": allow, "deny": [*all_stores, *commands, *ADMIN_API]},
            "subscribe": {"allow": sub, "deny": [c.command(">") for _, c in contexts]},
            # Its connection hosts a query service per read model, each answering `$SRV.INFO` /
            # `PING`: with two subscriptions on one connection the server let one reply through
            # at max 2 and both at max 4 (measured on nats-server 2.15): a delivery seems to
            # count as well. So twice the number of services.
            "allow_responses": {"max": max(2, 2 * len(models))},
        }
    for bc, ctx in contexts:
        if role == bc.actor_role:
            own = _stores(ctx, bc.work_queue)
            return {
                "publish": {
                    "allow": [*own, *bc.actor_publishes(ctx), *_read(ctx)],
                    "deny": [*(s for s in all_stores if s not in own), *commands, *ADMIN_API, f"{API}.CONSUMER.>"],
                },
                "subscribe": {"allow": [f"{ctx.command('*')} {ctx.queue_group}", *bc.actor_subscribes(ctx), "$SRV.>",
                                        *inbox],
                              "deny": [*(c.command(">") for _, c in contexts if c != ctx), *(c.query(">") for _, c in contexts)]},
                "allow_responses": True,
            }
        for extra in bc.roles:
            if role == extra.name:
                perms = extra.permissions(ctx, settings)
                publish, subscribe = perms.setdefault("publish", {}), perms.setdefault("subscribe", {})
                # Whatever a role allows itself, no event stream is its to write.
                publish["deny"] = [*publish.get("deny", []), *all_stores, *ADMIN_API,
                                   *(c.command(">") for _, c in contexts if c != ctx)]
                subscribe["allow"] = [*subscribe.get("allow", []), *inbox]
                subscribe["deny"] = [*subscribe.get("deny", []), *commands]
                return perms
    for pm in found.managers:
        if role == pm.name:
            by_name = dict(contexts)
            subjects = {bc.name: ctx for bc, ctx in contexts}
            sends = [subjects[name].command(n) for name, names in pm.sends.items() for n in names]
            allow = [*sends, parked.reader_wildcard(pm.reader)]
            for name in pm.consumes:
                allow += [api for part in subjects[name].parts for api in consumer_api(part.stream, pm.reader)]
            allow += [f"{API}.DIRECT.GET.{stream}" for name in pm.reads for stream in subjects[name].streams]
            # It may send what it declares, nothing else: every other command is denied.
            others = [ctx.command(n) for bc, ctx in by_name.items()
                      for n in (*bc.public_edge_commands(settings), *bc.internal_commands(settings))
                      if ctx.command(n) not in sends]
            return {
                "publish": {"allow": allow, "deny": [*all_stores, *ADMIN_API, *others]},
                "subscribe": {"allow": inbox, "deny": commands},
            }
    raise ValueError(f"unknown role {role!r}; roles: {', '.join(roles(settings))}")


def authorization(settings: Settings, passwords: dict[str, str]) -> dict[str, Any]:
    """The nats-server `authorization` block: every role a user with its permissions; no
    anonymous access (a client without credentials is refused)."""
    users = []
    for role in roles(settings):
        user: dict[str, Any] = {"user": role, "password": passwords[role]}
        if allowed := permissions(settings, role):
            user["permissions"] = allowed
        users.append(user)
    return {"users": users}


def server_config_block(settings: Settings, passwords: dict[str, str]) -> str:
    """`authorization { ... }` for a nats-server configuration file (its format reads JSON)."""
    return "authorization: " + json.dumps(authorization(settings, passwords), indent=2) + "\n"
