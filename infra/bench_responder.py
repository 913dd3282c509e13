"""A trivial NATS responder: the request-reply ceiling `jetsource bench` compares against."""

from __future__ import annotations

import asyncio
import sys

from bus.connection import connect


async def main(url: str, subject: str) -> None:
    nc = await connect(url, "bench-responder")

    async def reply(msg: object) -> None:
        await msg.respond(b'{"ok":true}')  # type: ignore[attr-defined]

    await nc.subscribe(subject, cb=reply)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main(sys.argv[1], sys.argv[2]))
    except ImportError:
        asyncio.run(main(sys.argv[1], sys.argv[2]))
