"""ProxyErrors (server/ray_proxy.py) behind the uvicorn server Ray's HTTP proxy runs, with Ray's own middleware chain
(``_apply_middlewares`` + ``proxy_middlewares``) around a fake proxy app: the two ways a plain client of Serve's
Python proxy got a bare 500 or a dropped connection after a replica was SIGKILLed under load
(tests/test_ray_serve.py::test_a_killed_replica_is_replaced_and_certserve_clients_see_no_failure[proxy]):

- a ``BaseException`` that is not an ``Exception`` (``asyncio.CancelledError``) from the proxy before any answer went
  past ``except Exception`` to uvicorn, which answers ``500 Internal Server Error``;
- an error raised after the client already had its whole answer was re-raised, so uvicorn closed the keep-alive
  connection under the next request the client had sent on it: "Server disconnected without sending a response".
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from server.ray_proxy import REPLICA_HEADER, ProxyErrors
from server.ray_serve import proxy_middlewares


@contextlib.contextmanager
def proxy_server(app):
    """``app`` wrapped as Ray's proxy wraps its app, served by uvicorn (httptools, as Ray's proxy) on a free port."""
    from ray.serve._private.http_util import _apply_middlewares

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(_apply_middlewares(app, proxy_middlewares()), lifespan="off", access_log=False,
                            log_level="critical", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 10
    while not server.started and time.monotonic() < end:
        time.sleep(0.01)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


async def _drain(receive) -> None:
    while (await receive()).get("more_body"):
        pass


async def _answer(send, body: bytes = b"{}") -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (REPLICA_HEADER, b"r1")]})
    await send({"type": "http.response.body", "body": body})


def test_a_cancelled_error_before_any_answer_becomes_a_json_503_not_a_bare_500():
    """The proxy app raises asyncio.CancelledError (not a cancel of the request's task) before answering: the client
    gets 503 replica_unavailable + Retry-After, and its connection stays usable. Run against the code before this
    test: 500 'Internal Server Error' from uvicorn (the second failure seen in the full suite)."""
    async def app(scope, receive, send):
        await _drain(receive)
        if scope["path"] == "/cancelled":
            raise asyncio.CancelledError()
        await _answer(send)

    with proxy_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        r = client.post("/cancelled", content=b"x")
        assert r.status_code == 503, (r.status_code, r.text)
        assert r.json()["error"]["code"] == "replica_unavailable" and r.headers["retry-after"]
        assert r.headers.get_list("x-request-id") == [r.json()["error"]["request_id"]]
        assert client.post("/ok", content=b"x").status_code == 200


def test_a_failure_after_a_complete_answer_does_not_drop_the_next_request_on_the_connection():
    """The proxy app answers in full, then raises while the client's next request is already on the same keep-alive
    connection (a plain client sends it as soon as it has its answer): that request is answered. Run against the
    code before this test: uvicorn closed the connection, RemoteProtocolError('Server disconnected without sending a
    response.') (the failure seen in the full suite)."""
    second_arrived: list[asyncio.Event] = []

    async def app(scope, receive, send):
        await _drain(receive)
        if not second_arrived:
            second_arrived.append(asyncio.Event())
        if scope["path"] == "/first":
            await _answer(send)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(second_arrived[0].wait(), 5)
            raise RuntimeError("the proxy failed after the answer was sent")
        second_arrived[0].set()
        await asyncio.sleep(0.3)  # the first request's failure lands while this one is in flight
        await _answer(send, b'{"second": true}')

    with proxy_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.post("/first", content=b"x").status_code == 200
        r = client.post("/second", content=b"x")
        assert r.status_code == 200 and r.json() == {"second": True}


def test_a_cancel_of_the_request_task_still_answers_503_and_propagates():
    """A real cancel of the request's task (the server stops) is honoured: the client still gets the 503, and the
    CancelledError reaches the server, which ends the task."""
    sent: list[dict] = []

    async def app(scope, receive, send):
        await asyncio.Event().wait()  # a request held until cancelled

    async def main():
        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/certify", "headers": [(b"x-request-id", b"abc")]}
        task = asyncio.ensure_future(ProxyErrors(app)(scope, receive, send))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 503 and b"replica_unavailable" in sent[1]["body"]
