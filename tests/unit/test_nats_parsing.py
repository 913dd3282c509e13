"""Our lean parsers of what NATS delivers agree with nats-py's own: header blocks (also on odd
input) and the positions in JetStream ack subjects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.connection import _Client
from bus.pull import position

BLOCKS = [
    b"Jetsource-Command-Id: 0Ab3\r\nNats-Batch-Id: abc\r\nNats-Batch-Sequence: 17\r\n\r\n",
    b"Name:Value\r\nTabbed:\tx\t\r\n",
    b"No-Colon-Line\r\nGood: 1\r\n",
    b"Bad Name: skipped\r\nOk: kept\r\n",
    b"Colons: a:b:c\r\nEmpty:\r\n",
    "Unicode: grüße\r\nNon-Ascii-Näme: skipped\r\n".encode(),
    b"Repeated: first\r\nRepeated: last\r\n",
    b"\r\n",
    b"",
]


@pytest.mark.parametrize("raw", BLOCKS)
def test_same_result_as_nats_py(raw: bytes) -> None:
    assert _Client._parse_header_lines(raw) == Client._parse_header_lines(raw)  # noqa: SLF001


ACK_SUBJECTS = [
    "$JS.ACK.TASKS.projection_tasks.1.123456.123450.1764244623123456789.17",
    "$JS.ACK._.ACCHASH.TASKS.projection_tasks.1.123456.123450.1764244623123456789.0.token",
    "$JS.ACK.hub.ACCHASH.TASKS.projection_tasks.3.9.8.1764244623000000000.250",
]


@pytest.mark.parametrize("reply", ACK_SUBJECTS)
def test_position_matches_nats_py_metadata(reply: str) -> None:
    msg = Msg(_client=None, subject="tasks.events.t1", reply=reply, data=b"")  # type: ignore[arg-type]
    ours, theirs = position(msg), msg.metadata
    assert (ours.stream_seq, ours.pending) == (theirs.sequence.stream, theirs.num_pending)
    # The time to the microsecond, truncated (nats-py rounds through a float): as a Direct Get
    # answer's `Nats-Time-Stamp` reads, so that both ways of reading a stream agree.
    assert abs(datetime.fromisoformat(ours.time) - theirs.timestamp) <= timedelta(microseconds=1)
    tokens = reply.split(".")
    ns = tokens[(0 if len(tokens) == 9 else 2) + 7]
    stamp = datetime.fromtimestamp(int(ns) // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + ns[-9:] + "Z"
    assert datetime.fromisoformat(ours.time) == datetime.fromisoformat(stamp)


@pytest.mark.parametrize("reply", [None, "", "_INBOX.abc", "$JS.ACK.TOO.SHORT", "$JS.ACK.A.B.C.1.2.3.4.5"])
def test_position_refuses_what_is_not_a_jetstream_delivery(reply: str | None) -> None:
    with pytest.raises(ValueError, match="not a JetStream delivery"):
        position(Msg(_client=None, subject="x", reply=reply or "", data=b""))  # type: ignore[arg-type]


class _Recorder:
    """What a parser hands the client: messages and the other operations, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, ...]] = []

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self.seen.append(("msg", sid, bytes(subject), bytes(reply), data, headers or None))

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))

    async def _process_info(self, info: dict[str, object]) -> None:
        self.seen.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.seen.append(("err", err))


def _hmsg(subject: str, sid: int, reply: str, headers: bytes, payload: bytes) -> bytes:
    line = f"HMSG {subject} {sid} {reply + ' ' if reply else ''}{len(headers)} {len(headers) + len(payload)}\r\n"
    return line.encode() + headers + payload + b"\r\n"


WIRE = (b"INFO {\"server_id\":\"x\"}\r\n+OK\r\nMSG a.b 1 5\r\nhello\r\nMSG a.b 2 _INBOX.x 3\r\nabc\r\n"
        + _hmsg("ev.o-1", 3, "_INBOX.y.tok", b"NATS/1.0\r\nA: b\r\n\r\n", b"hello") + b"PING\r\n"
        + _hmsg("ev.o-2", 4, "", b"NATS/1.0 204 EOB\r\nNats-Pending: 0\r\n\r\n", b"") + b"MSG x 5 0\r\n\r\n"
        + b"PONG\r\n-ERR 'Permissions Violation'\r\n" + _hmsg("big", 6, "", b"NATS/1.0\r\n\r\n", b"z" * 1000))


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 16, 61, 4096])
async def test_the_fast_protocol_parser_hands_over_what_nats_py_s_does(chunk: int) -> None:
    from nats.protocol.parser import Parser

    from bus.connection import _FastParser

    results = []
    for kind in (Parser, _FastParser):
        recorder = _Recorder()
        parser = kind(recorder)
        for i in range(0, len(WIRE), chunk):
            await parser.parse(WIRE[i:i + chunk])
        results.append(recorder.seen)
    assert results[1] == results[0]
    assert [s[0] for s in results[0]].count("msg") == 6
