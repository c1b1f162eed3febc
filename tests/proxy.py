"""A TCP proxy the fault tests put between processes and a service, to take the service away and back."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any


class Proxy:
    """Forwards connections on a local port to `host`:`port`, in a thread of its own.

    `cut()` drops every connection (a reset to both ends) and stops listening, so new ones are refused;
    `stall()` keeps connections and listening but forwards nothing, as a server gone silent;
    `restore()` goes back to forwarding.
    """

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="proxy", daemon=True)
        self.server: asyncio.Server | None = None
        self.flowing = asyncio.Event()
        self.links: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> Proxy:
        self.thread.start()
        self._call(self._listen())
        return self

    def __exit__(self, *_: object) -> None:
        self._call(self._close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        self._call(self._drop())

    def stall(self) -> None:
        """Forward nothing more, in either direction, on any connection, old or new."""
        self.loop.call_soon_threadsafe(self.flowing.clear)

    def restore(self) -> None:
        """Listen and forward again."""
        if self.server is None:
            self._call(self._listen())
        self.loop.call_soon_threadsafe(self.flowing.set)

    def _call(self, work: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(work, self.loop).result(10)

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        self.flowing.set()

    async def _drop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.links):
            writer.transport.abort()
        self.links.clear()

    async def _close(self) -> None:
        self.flowing.set()
        await self._drop()
        links = asyncio.all_tasks() - {asyncio.current_task()}
        if links:
            await asyncio.wait(links, timeout=5)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.links |= {writer, upstream}
        await asyncio.gather(self._pump(reader, upstream), self._pump(upstream_reader, writer))
        self.links -= {writer, upstream}

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                await self.flowing.wait()
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()
