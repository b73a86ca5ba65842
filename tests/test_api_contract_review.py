"""The HTTP API as a contract: what the server really answers, checked against the document /openapi.json publishes
(each answer validated against the schema of its route and status), every method on every route, and the error
statuses a client generated from the document must know."""

from __future__ import annotations

import json

import numpy as np
import pytest
import referencing.jsonschema
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from server.app import create_app
from server.errors import STATUS
from server.settings import Settings

KEY = "contract-key"
GREY = np.full((28, 28), 0.5).tolist()
GET_ROUTES = ["/healthz", "/readyz", "/v1/models", "/.well-known/jwks.json", "/metrics"]


@pytest.fixture(scope="module")
def client():
    settings = Settings(max_samples=300, auto_max_samples=200, default_deadline_ms=20_000, api_keys=[KEY],
                        max_body_bytes=64 * 1024)
    with TestClient(create_app(settings, seed=11), headers={"x-api-key": KEY}, follow_redirects=False) as c:
        yield c


@pytest.fixture(scope="module")
def doc(client):
    return client.get("/openapi.json").json()


def _assert_documented(doc: dict, method: str, path: str, r) -> None:
    """``r`` (an answer to ``method path``) is documented: its status is listed for the operation, with its content
    type, and its body validates against that schema (the document's $refs resolved in the document)."""
    op = doc["paths"][path][method.lower()]
    assert str(r.status_code) in op["responses"], f"{method} {path}: {r.status_code} is not documented: {r.text}"
    content = op["responses"][str(r.status_code)].get("content", {})
    ctype = r.headers["content-type"].split(";")[0]
    assert ctype in content, f"{method} {path} {r.status_code}: {ctype} not documented ({list(content)})"
    resource = Resource.from_contents(doc, default_specification=referencing.jsonschema.DRAFT202012)
    schema = json.loads(json.dumps(content[ctype]["schema"]).replace('"#/components/', '"doc#/components/'))
    errors = [f"{e.message} at {list(e.path)}" for e in
              Draft202012Validator(schema, registry=Registry().with_resource("doc", resource)).iter_errors(r.json())]
    assert not errors, f"{method} {path} {r.status_code}: {errors[:3]}"


@pytest.mark.parametrize("path", GET_ROUTES)
def test_head_on_a_get_route_is_its_get_without_the_body(client, path):
    """Load balancers and probes (Kubernetes, HAProxy's option httpchk) may send HEAD; RFC 9110 has every GET
    resource take it. It was 405 on every route of the app (Starlette's own /docs took it)."""
    got, head = client.get(path), client.head(path)
    assert head.status_code == got.status_code == 200, head.text
    assert head.headers["content-type"] == got.headers["content-type"] and head.content == b""
    assert head.headers["x-request-id"]
    r = client.request("PATCH", path)  # the methods a GET route takes, as Allow and the message state them
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert "GET, HEAD" in r.json()["error"]["message"]


def test_head_elsewhere_answers_as_the_get_would(client):
    r = client.head("/certify")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""
    assert client.head("/no-such-route").status_code == 404
    assert "head" not in {m for ops in client.get("/openapi.json").json()["paths"].values() for m in ops}


@pytest.mark.parametrize("method, path", [("POST", "/certify/"), ("POST", "/certify/batch/"), ("GET", "/healthz/"),
                                          ("GET", "/v1/models/")])
def test_a_trailing_slash_is_a_json_404_that_names_the_route(client, method, path):
    """Was a bare ``307`` (empty body, not the envelope) whose Location was built from the request's Host header:
    a client that follows it re-sends the POST, image and all, to whatever host that names."""
    r = client.request(method, path, json={"image": GREY} if method == "POST" else None)
    assert r.status_code == 404 and "location" not in r.headers, (r.status_code, r.headers)
    err = r.json()["error"]
    assert err["code"] == "not_found" and err["request_id"] == r.headers["x-request-id"]
    assert f"did you mean {path.rstrip('/')} " in err["message"]


@pytest.mark.parametrize("path", ["/certify", "/certify/batch"])
def test_every_error_status_of_a_certify_route_is_documented_with_its_codes(doc, path):
    """A client generated from the document knows each status a certify route answers (the connection's 400 and 431
    were missing) and, in its description, the stable codes it carries (none were named); a 503 says Retry-After."""
    responses = doc["paths"][path]["post"]["responses"]
    expected = {400, 431} | {s for c, s in STATUS.items() if c not in ("not_found", "method_not_allowed")}
    for status in sorted(expected):
        documented = responses.get(str(status))
        assert documented is not None, f"{path}: {status} not documented"
        assert documented["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
        codes = {c for c, s in STATUS.items() if s == status} or {"bad_request"}
        missing = [c for c in codes if f"`{c}`" not in documented["description"]]
        assert not missing, f"{path} {status}: codes {missing} not named"
    assert "Retry-After" in responses["503"]["headers"]


@pytest.mark.parametrize("path, codes", [("/healthz", {"engine_down"}), ("/v1/models", {"starting"}),
                                         ("/.well-known/jwks.json", {"starting"}),
                                         ("/readyz", {"engine_down", "audit_unavailable", "starting", "draining"})])
def test_the_503_of_a_get_route_names_its_codes(doc, path, codes):
    documented = doc["paths"][path]["get"]["responses"]["503"]
    assert all(f"`{c}`" in documented["description"] for c in codes), documented["description"]
    assert "Retry-After" in documented["headers"]


def test_a_401_names_the_scheme_it_takes(client):
    """RFC 9110 15.5.2: a 401 MUST carry WWW-Authenticate (clients and proxies rely on it); it had none."""
    r = client.post("/certify", json={"image": GREY}, headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")


def test_metrics_documents_its_text_answer(client, doc):
    r = client.get("/metrics")
    assert r.headers["content-type"].split(";")[0] in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


@pytest.mark.parametrize("body", [
    {"mode": "surrogate"}, {"mode": "auto"}, {"mode": "sequential", "max_samples": 100},
    {"mode": "fixed", "max_samples": 100}, {"mode": "cohen", "max_samples": 100},
    {"per_input": True, "max_samples": 100}, {"mode": "sequential", "deadline_ms": 1},
], ids=["surrogate", "auto", "sequential", "fixed", "cohen", "per_input", "deadline"])
def test_certificates_of_every_mode_validate_against_the_schema(client, doc, body):
    r = client.post("/certify", json={"image": GREY, **body})
    assert r.status_code == 200, r.text
    _assert_documented(doc, "POST", "/certify", r)


def test_batch_and_the_get_routes_validate_against_the_schema(client, doc):
    r = client.post("/certify/batch", json={"images": [GREY, GREY], "mode": "surrogate"})
    assert r.status_code == 200, r.text
    _assert_documented(doc, "POST", "/certify/batch", r)
    for path in GET_ROUTES:
        if path != "/metrics":
            _assert_documented(doc, "GET", path, client.get(path))


@pytest.mark.parametrize("kwargs, status, code", [
    ({"json": {"image": GREY}, "headers": {"x-api-key": "wrong"}}, 401, "unauthorized"),
    ({"content": b"x" * (64 * 1024 + 1), "headers": {"content-type": "application/json"}}, 413, "body_too_large"),
    ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ({"content": b"{", "headers": {"content-type": "application/json"}}, 422, "bad_json"),
    ({"json": {"image": GREY, "alpha": 1}}, 422, "bad_request"),
    ({"json": {"image": GREY, "mode": "surrogate", "alpha": 1e-9}}, 422, "alpha_below_alpha_cal"),
    ({"json": {}}, 422, "missing_image"),
], ids=["401", "413", "415", "422-json", "422-range", "422-surrogate", "422-missing"])
def test_errors_validate_against_the_schema(client, doc, kwargs, status, code):
    r = client.post("/certify", **kwargs)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    _assert_documented(doc, "POST", "/certify", r)


def test_a_503_validates_and_says_retry_after(client, doc):
    state = client.app.state
    saved, state.inflight = state.inflight, state.settings.max_inflight_requests
    try:
        r = client.post("/certify", json={"image": GREY})
    finally:
        state.inflight = saved
    assert r.status_code == 503 and r.json()["error"]["code"] == "inflight_limit" and r.headers["retry-after"]
    _assert_documented(doc, "POST", "/certify", r)
