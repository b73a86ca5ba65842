"""The Python HTTP clients of the benchmarks: a raw HTTP/1.1 keep-alive client (cheaper per request than httpx,
so that a generator sharing the machine with the server keeps up) and closed-loop ``mode=sequential`` load."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from bench.server_common import BOUNDARY, multipart_body, png_bytes


class RawHTTP:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams (a pool of connections to one host): far cheaper
    per request than httpx, so that the open-loop generator, which shares the machine with the server, keeps up."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: list = []

    async def post(self, path: str, body: bytes, content_type: str) -> int:
        conn = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        reader, writer = conn
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        writer.write(head + body)
        await writer.drain()
        status_line = await reader.readline()
        length, keep = 0, True
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "connection" and value.strip().lower() == "close":
                keep = False
        if length:
            await reader.readexactly(length)
        if keep:
            self.idle.append(conn)
        else:
            writer.close()
        return int(status_line.split()[1])

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


class SequentialLoad:
    """``clients`` closed-loop clients in a background thread, each posting mode=sequential requests (real test
    images, default alpha and budget) back to back until stopped: the worker is busy while the surrogate path is
    measured."""

    def __init__(self, url: str, images: np.ndarray, clients: int):
        self.bodies = [multipart_body(png_bytes(x), mode="sequential") for x in images]
        self.host, port = url.removeprefix("http://").split(":")
        self.port, self.clients = int(port), clients
        self.done, self.codes, self.samples = 0, {}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self):
        client = RawHTTP(self.host, self.port)
        ctype = f"multipart/form-data; boundary={BOUNDARY}"

        async def loop(k):
            i = k
            while not self._stop.is_set():
                code = str(await client.post("/certify", self.bodies[i % len(self.bodies)], ctype))
                self.codes[code] = self.codes.get(code, 0) + 1
                self.done += 1
                i += self.clients

        await asyncio.gather(*(loop(k) for k in range(self.clients)))
        client.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=300)

