"""A trivial NATS responder: the request-reply ceiling `jetsource bench` compares against."""

from __future__ import annotations

import asyncio
import sys

from bus.connection import Credentials, connect
from infra.settings import Settings


async def main(url: str, subject: str) -> None:
    settings = Settings()  # the bench hands its identity down in JETSOURCE_NATS_USER / _PASSWORD
    nc = await connect(url, "bench-responder",
                       credentials=Credentials(user=settings.nats_user or None, password=settings.nats_password))

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
