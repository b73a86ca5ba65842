"""Mutation audit, round 7d (continued from tests/test_mutation_review7d.py): Ray's proxy middleware
(server.ray_proxy.ProxyErrors: JSON 503s in place of the proxy's own bare 500s, one request id).

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it. The middleware is driven as the proxy's server
drives it (an ASGI call with receive/send); no Ray cluster is started.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray.serve")

from server.ray_proxy import REPLICA_HEADER, ProxyErrors  # noqa: E402

# ------------------------------------------------------------------------------- Ray's proxy: ProxyErrors
SCOPE = {"type": "http", "method": "POST", "path": "/certify", "headers": [(b"x-request-id", b"req-1")]}


def _through_proxy_errors(app, scope=SCOPE, sent: list | None = None) -> list[dict]:
    """The messages ProxyErrors sends for ``app`` (the proxy's own app), called as the proxy's server calls it."""
    sent = [] if sent is None else sent

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(ProxyErrors(app)(scope, receive, send))
    return sent


def _answer(status: int, headers=(), body=b"Internal Server Error", then=None):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": list(headers)})
        await send({"type": "http.response.body", "body": body})
        if then is not None:
            raise then
    return app


def _envelope(sent: list[dict]) -> tuple[int, dict, dict]:
    import json

    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"], sent
    return sent[0]["status"], dict(sent[0]["headers"]), json.loads(sent[1]["body"])


def test_the_proxys_own_500_becomes_a_json_503_with_retry_after():
    """Mutants: only statuses above 500 replaced (the proxy's bare ``500 Internal Server Error`` for a request whose
    replica died passed as is), a default Retry-After of 0 (clients retried at once, on the replica still dying)."""
    status, headers, body = _envelope(_through_proxy_errors(_answer(500, [(b"x-request-id", b"req-1")])))
    assert status == 503 and body["error"]["code"] == "replica_unavailable"
    assert headers[b"retry-after"] == b"1" and headers[b"content-type"] == b"application/json"
    assert body["error"]["request_id"] == "req-1" and headers[b"x-request-id"] == b"req-1"
    # a replica's own 500 (marked) is its answer: passed unchanged
    sent = _through_proxy_errors(_answer(500, [(REPLICA_HEADER, b"r1")]))
    assert sent[0]["status"] == 500


def test_a_failure_after_the_replaced_answer_is_not_raised():
    """Mutant: the replaced answer not counted as complete: when the proxy then raised (as it does after its bare
    500), the error reached uvicorn, which closed the keep-alive connection under the client's next request."""
    sent = _through_proxy_errors(_answer(500, then=RuntimeError("the replica's stream broke")))
    assert _envelope(sent)[0] == 503


def test_a_failure_in_the_middle_of_an_answer_is_raised():
    """Mutants: an answer counted complete at its first body chunk, or the re-raise of a partial answer dropped: a
    proxy failure mid-body then left the client a truncated body on an open connection (or a second response start
    after the first); only closing the connection tells the client its answer is cut."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(REPLICA_HEADER, b"r1")]})
        await send({"type": "http.response.body", "body": b'{"partial": ', "more_body": True})
        raise RuntimeError("the replica died mid-answer")

    sent: list[dict] = []
    with pytest.raises(RuntimeError, match="mid-answer"):
        _through_proxy_errors(app, sent=sent)
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [200]


def test_a_proxy_that_answers_nothing_gets_the_503():
    """Mutant: no answer when the proxy app returned without one (uvicorn then sends its bare 500)."""
    async def app(scope, receive, send):
        return None

    status, headers, body = _envelope(_through_proxy_errors(app))
    assert status == 503 and body["error"]["code"] == "replica_unavailable" and headers[b"retry-after"] == b"1"


def test_a_cancelled_error_that_is_no_cancel_of_the_task_is_not_raised():
    """Mutant: every CancelledError taken as a cancel of the request's task (``cancelling() >= 0``): one passing by
    from an inner future (a replica's stream cancelled) was re-raised after the 503, and uvicorn closed the
    connection."""
    async def app(scope, receive, send):
        raise asyncio.CancelledError()

    status, _, body = _envelope(_through_proxy_errors(app))
    assert status == 503 and body["error"]["code"] == "replica_unavailable"


def test_of_several_request_ids_the_one_kept_is_one_the_app_echoes():
    """Mutant: the last of several X-Request-ID headers kept when the first is echoable: the kept one (65 characters)
    was not echoable, so the app answered a fresh id in the body while Ray's RequestIdMiddleware sent the raw one in
    the header."""
    from server.ray_proxy import one_request_id

    scope = one_request_id({**SCOPE, "headers": [(b"x-request-id", b"trace-1"), (b"x-request-id", b"a" * 65)]})
    assert [v for k, v in scope["headers"] if k == b"x-request-id"] == [b"trace-1"]
