"""Our lean parsers of what NATS delivers agree with nats-py's own: header blocks (also on odd
input) and the positions in JetStream ack subjects."""

from __future__ import annotations

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
    assert (ours.stream_seq, ours.time, ours.pending) == (
        theirs.sequence.stream, theirs.timestamp.isoformat(), theirs.num_pending)


@pytest.mark.parametrize("reply", [None, "", "_INBOX.abc", "$JS.ACK.TOO.SHORT", "$JS.ACK.A.B.C.1.2.3.4.5"])
def test_position_refuses_what_is_not_a_jetstream_delivery(reply: str | None) -> None:
    with pytest.raises(ValueError, match="not a JetStream delivery"):
        position(Msg(_client=None, subject="x", reply=reply or "", data=b""))  # type: ignore[arg-type]
