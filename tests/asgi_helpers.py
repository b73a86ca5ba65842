"""The app driven at the ASGI level, as a server drives it: for tests that need what a TestClient cannot do (a client
that goes away while its request is still running)."""

from __future__ import annotations

import asyncio


def json_post_scope(path: str, body: bytes) -> dict:
    """The ASGI scope of a POST of the JSON ``body`` to ``path``, as uvicorn builds it."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}


class DisconnectingClient:
    """A client that sends ``body`` in one message and then waits: each later receive() returns http.disconnect once
    ``gone`` is set. ``sent`` holds every message the app sent. Create it inside the running event loop."""

    def __init__(self, body: bytes):
        self.gone, self.sent = asyncio.Event(), []
        self._unsent = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive(self) -> dict:
        if self._unsent:
            return self._unsent.pop()
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)
