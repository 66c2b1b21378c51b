"""``python -m bench.upstream``: the tests' fake Interakt, answering after 50 ms.

Prints its base URL on the first line of stdout once it listens.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests.fake_interakt import FakeInterakt

LATENCY_SECONDS = 0.05


class SlowInterakt(FakeInterakt):
    """A healthy Interakt that takes as long as a real one, and forgets what it received."""

    async def _message(self, request: web.Request) -> web.Response:
        await asyncio.sleep(LATENCY_SECONDS)
        response = await super()._message(request)
        self.received.clear()  # a benchmark sends far more than a test wants to keep
        return response


async def main() -> None:
    fake = await SlowInterakt().start()
    print(fake.base_url, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
