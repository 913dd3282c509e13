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

from actors.orders.messages import COMMANDS as ORDER_COMMANDS
from bus.connection import Credentials
from bus.subjects import Context, Parked
from infra.embedded import write_private
from infra.settings import NatsIdentity, Settings

ADMIN = "admin"
EDGE = "edge"
ORDERS_ACTOR = "orders_actor"
TASKS_ACTOR = "tasks_actor"
PROJECTOR = "projector"
WORKER = "worker"
FULFILMENT = "fulfilment"
ROLES = (ADMIN, EDGE, ORDERS_ACTOR, TASKS_ACTOR, PROJECTOR, WORKER, FULFILMENT)

# Commands only workers send: attempt bookkeeping on tasks.
TASK_WORKER_COMMANDS = ("claim", "start", "progress", "complete", "fail", "claim_batch", "start_batch", "complete_batch")
# Commands only the fulfilment process manager sends.
ORDER_MANAGER_COMMANDS = ("ship", "fulfilment_failed")
TASK_MANAGER_COMMANDS = ("submit_internal",)
# What the edge (and so any HTTP client) may send.
ORDER_PUBLIC_COMMANDS = tuple(n for n in ORDER_COMMANDS if n != "fulfilment_failed")
TASK_PUBLIC_COMMANDS = ("submit", "submit_batch", "cancel", "retry")

API = "$JS.API"


def secrets_dir(settings: Settings) -> Path:
    return settings.data_dir / "secrets"


def ensure_secrets(settings: Settings) -> dict[str, str]:
    """Each role's password, created (random, 256 bits) on first use; files are mode 0600."""
    folder = secrets_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    out = {}
    for role in ROLES:
        path = folder / f"{role}.password"
        password = path.read_text().strip() if path.exists() else ""
        if len(password) < 32:  # missing, or cut short: a weak (even empty) password is worse than a new one
            password = secrets.token_urlsafe(32)
            write_private(path, password)
        os.chmod(path, 0o600)
        out[role] = password
    return out


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


def _consumer_api(stream: str, durable: str, *, manage: bool = True) -> list[str]:
    """What a reader needs of one durable consumer: pull from it and ack what it was given; to
    `manage` it, also (re)create, look at and delete it (a projection re-creates its consumer at
    its checkpoint; workers share consumers the admin creates, which no worker may redefine)."""
    use = [f"{API}.CONSUMER.MSG.NEXT.{stream}.{durable}", f"$JS.ACK.{stream}.{durable}.>"]
    if not manage:
        return use
    return [*use, f"{API}.CONSUMER.CREATE.{stream}.{durable}", f"{API}.CONSUMER.CREATE.{stream}.{durable}.>",
            f"{API}.CONSUMER.DURABLE.CREATE.{stream}.{durable}", f"{API}.CONSUMER.INFO.{stream}.{durable}",
            f"{API}.CONSUMER.DELETE.{stream}.{durable}"]


def permissions(settings: Settings, role: str) -> dict[str, Any]:
    """The nats-server permissions of one role. Everything not allowed is denied; the explicit
    denies make the rules that matter most hold even if an allow is widened by mistake."""
    orders, tasks = Context("orders", settings.namespace), Context("tasks", settings.namespace)
    parked = Parked(settings.namespace)
    inbox = [f"_INBOX.{role}.>"]
    stores = [orders.events_wildcard, orders.outbox_wildcard, tasks.events_wildcard, tasks.outbox_wildcard,
              tasks.queue_wildcard]
    # Stream and server administration: the admin's alone.
    admin_api = [f"{API}.STREAM.{op}.>" for op in ("CREATE", "UPDATE", "DELETE", "PURGE", "MSG.DELETE", "SNAPSHOT",
                                                     "RESTORE", "PEER.REMOVE", "LEADER.STEPDOWN")]
    admin_api += [f"{API}.ACCOUNT.>", f"{API}.META.>", f"{API}.SERVER.>"]
    commands = [orders.command(">"), tasks.command(">"), orders.query(">"), tasks.query(">")]
    if role == ADMIN:
        return {}  # no permissions block: everything, without the server checking every message
    if role == EDGE:
        return {
            "publish": {
                "allow": [*(orders.command(n) for n in ORDER_PUBLIC_COMMANDS), *(tasks.command(n) for n in TASK_PUBLIC_COMMANDS),
                          orders.query("*"), tasks.query("*"),
                          f"{API}.DIRECT.GET.{orders.stream}", f"{API}.DIRECT.GET.{tasks.stream}",
                          f"{API}.STREAM.INFO.{orders.stream}"],
                "deny": [*stores, *admin_api, f"{API}.CONSUMER.>", tasks.live(">"), orders.command("fulfilment_failed"),
                         *(tasks.command(n) for n in (*TASK_WORKER_COMMANDS, *TASK_MANAGER_COMMANDS))],
            },
            "subscribe": {"allow": inbox, "deny": commands},
        }
    if role == ORDERS_ACTOR:
        return {
            "publish": {
                "allow": [orders.events_wildcard, orders.outbox_wildcard,
                          f"{API}.DIRECT.GET.{orders.stream}", f"{API}.STREAM.INFO.{orders.stream}"],
                "deny": [*stores[2:], *commands, *admin_api, f"{API}.CONSUMER.>"],
            },
            "subscribe": {"allow": [f"{orders.command('*')} {orders.queue_group}", "$SRV.>", *inbox],
                          "deny": [tasks.command(">"), orders.query(">"), tasks.query(">")]},
            "allow_responses": True,
        }
    if role == TASKS_ACTOR:
        return {
            "publish": {
                "allow": [tasks.events_wildcard, tasks.outbox_wildcard, tasks.queue_wildcard, tasks.live(">"),
                          f"{API}.DIRECT.GET.{tasks.stream}", f"{API}.STREAM.INFO.{tasks.stream}"],
                "deny": [*stores[:2], *commands, *admin_api, f"{API}.CONSUMER.>"],
            },
            "subscribe": {"allow": [f"{tasks.command('*')} {tasks.queue_group}", tasks.live("cancel", "*"), "$SRV.>", *inbox],
                          "deny": [orders.command(">"), orders.query(">"), tasks.query(">")]},
            "allow_responses": True,
        }
    if role == PROJECTOR:
        return {
            "publish": {
                "allow": [*_consumer_api(orders.stream, orders.consumer("orders")),
                          *_consumer_api(tasks.stream, tasks.consumer("tasks")),
                          f"{API}.STREAM.INFO.{orders.stream}", f"{API}.STREAM.INFO.{tasks.stream}",
                          # each reader parks under its own name only (an operator's retry acts on it)
                          parked.reader_wildcard(orders.consumer("orders")), parked.reader_wildcard(tasks.consumer("tasks"))],
                "deny": [*stores, *commands, *admin_api],
            },
            "subscribe": {"allow": [f"{orders.query('*')} {orders.queue_group}.query",
                                    f"{tasks.query('*')} {tasks.queue_group}.query", "$SRV.>", *inbox],
                          "deny": [orders.command(">"), tasks.command(">")]},
            # Its connection hosts two query services, each answering `$SRV.INFO` / `PING`: with
            # two subscriptions on one connection the server let one reply through at max 2 and
            # both at max 4 (measured on nats-server 2.15): a delivery seems to count as well.
            "allow_responses": {"max": 4},
        }
    if role == WORKER:
        from actors.tasks.messages import PRIORITIES
        from actors.tasks.worker import PARKED_READER as WORKERS_READER

        return {
            "publish": {
                "allow": [*(tasks.command(n) for n in TASK_WORKER_COMMANDS),
                          *(api for p in PRIORITIES for api in _consumer_api(tasks.stream, tasks.work_consumer(p), manage=False)),
                          parked.reader_wildcard(WORKERS_READER)],
                "deny": [*stores, *admin_api, orders.command(">"), tasks.live(">"),
                         *(tasks.command(n) for n in (*TASK_PUBLIC_COMMANDS, *TASK_MANAGER_COMMANDS))],
            },
            "subscribe": {"allow": [tasks.live("ready"), tasks.live("cancel", "*"), *inbox], "deny": commands},
        }
    if role == FULFILMENT:
        from actors.fulfilment import DURABLE

        return {
            "publish": {
                "allow": [*(orders.command(n) for n in ORDER_MANAGER_COMMANDS), *(tasks.command(n) for n in TASK_MANAGER_COMMANDS),
                          *_consumer_api(orders.stream, DURABLE), *_consumer_api(tasks.stream, DURABLE),
                          parked.reader_wildcard(DURABLE)],
                "deny": [*stores, *admin_api, *(tasks.command(n) for n in TASK_WORKER_COMMANDS)],
            },
            "subscribe": {"allow": inbox, "deny": commands},
        }
    raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")


def authorization(settings: Settings, passwords: dict[str, str]) -> dict[str, Any]:
    """The nats-server `authorization` block: every role a user with its permissions; no
    anonymous access (a client without credentials is refused)."""
    users = []
    for role in ROLES:
        user: dict[str, Any] = {"user": role, "password": passwords[role]}
        if allowed := permissions(settings, role):
            user["permissions"] = allowed
        users.append(user)
    return {"users": users}


def server_config_block(settings: Settings, passwords: dict[str, str]) -> str:
    """`authorization { ... }` for a nats-server configuration file (its format reads JSON)."""
    return "authorization: " + json.dumps(authorization(settings, passwords), indent=2) + "\n"
