"""``python -m bench.upstream [REDIS_PORT]``: the tests' fake Interakt, answering after 50 ms,
taking notes on each message: its number, when it arrived and when it was answered.

Prints its base URL on the first line of stdout once it listens, and on the second the URL of
its notes: ``GET`` there hands over (and forgets) the notes taken since the last ``GET``, as a
JSON list; ``PUT`` there with ``1`` makes each note also hold Redis' ``INFO commandstats``
counts (calls by command) as they were when the message arrived (on the Redis at REDIS_PORT),
``0`` stops that. Times are ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process of
the machine, so they compare with the load client's).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import redis
from aiohttp import web

from bench.__main__ import command_counts
from tests.fake_interakt import FakeInterakt

LATENCY_SECONDS = 0.05
NOTES_PATH = "/bench/notes"


class SlowInterakt(FakeInterakt):
    """A healthy Interakt that takes as long as a real one, and forgets what it received."""

    def __init__(self, redis_port: int | None = None) -> None:
        super().__init__()
        self.notes: list[dict[str, Any]] = []
        self.count_commands = False
        self._redis = redis.Redis(port=redis_port) if redis_port else None
        self._notes_runner: web.AppRunner | None = None
        self.notes_url = ""

    async def _message(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        # Blocking, so nothing else runs in between; a send waits on its answer meanwhile.
        commands = command_counts(self._redis) if self._redis and self.count_commands else None
        await asyncio.sleep(LATENCY_SECONDS)
        response = await super()._message(request)
        body = await request.json()  # aiohttp keeps the body read: no second read
        self.notes.append(
            {
                "phone": body.get("countryCode", "") + body.get("phoneNumber", ""),
                "arrived": arrived,
                "answered": time.monotonic(),
                "commands": commands,
            }
        )
        self.received.clear()  # a benchmark sends far more than a test wants to keep
        self.queued.clear()
        return response

    async def start(self) -> SlowInterakt:
        await super().start()
        app = web.Application()
        app.router.add_get(NOTES_PATH, self._take_notes)
        app.router.add_put(NOTES_PATH, self._count_commands)
        self._notes_runner = web.AppRunner(app, access_log=None)
        await self._notes_runner.setup()
        await web.TCPSite(self._notes_runner, "127.0.0.1", 0).start()
        self.notes_url = f"http://127.0.0.1:{self._notes_runner.addresses[0][1]}{NOTES_PATH}"
        return self

    async def _take_notes(self, request: web.Request) -> web.Response:
        notes, self.notes = self.notes, []
        return web.json_response(notes)

    async def _count_commands(self, request: web.Request) -> web.Response:
        if self._redis is None:
            return web.Response(status=409, text="started without a Redis port")
        self.count_commands = (await request.text()).strip() == "1"
        if self.count_commands:
            # Connected now: redis-py's connection set-up (CLIENT SETINFO) is no send's command.
            command_counts(self._redis)
        return web.Response(status=204)


async def main() -> None:
    fake = await SlowInterakt(int(sys.argv[1]) if len(sys.argv) > 1 else None).start()
    print(fake.base_url, fake.notes_url, sep="\n", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
