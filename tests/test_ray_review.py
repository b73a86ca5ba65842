"""Review of the Ray Serve layer (server/ray_serve.py), without a cluster: what a replica reports to Serve's health
probe, the deployment options of ``build_app``, and the settings ``certserve serve --replicas N`` hands its replicas.
"""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from server import ray_serve  # noqa: E402
from server.app import build_service, readiness  # noqa: E402
from server.ray_serve import CertserveDeployment, replica_options  # noqa: E402
from server.settings import Settings  # noqa: E402


class _Broken(Exception):
    pass


def test_check_health_fails_while_the_audit_log_is_unwritable(tmp_path):
    """A replica whose audit log cannot be written refuses every certification request (503 audit_unavailable) and
    its /readyz says so; behind Ray Serve nothing reads /readyz, so Serve's health probe must fail too, or Serve keeps
    sending the replica its share of the traffic for as long as the log stays broken (Serve replaces a replica only
    after 3 failed probes in a row, 15 s at period 5 s: a single failed append, held HOLD_SECONDS = 5 s, does not)."""
    service = build_service(Settings(threads=1, audit_log=str(tmp_path / "audit.jsonl")))
    service.start()
    try:
        replica = SimpleNamespace(_service=service, _replica="test")
        check = CertserveDeployment.func_or_class.check_health
        check(replica)  # healthy
        audit = service.sealer.audit
        audit._failed, audit._failed_at = True, float("inf")  # as after a failed append, still within its hold
        state = SimpleNamespace(draining=False, ready=True, service=service)
        assert readiness(state) == "audit_unavailable"  # what /readyz and certserve_ready say
        with pytest.raises(RuntimeError, match="audit"):
            check(replica)
        audit._failed = False  # writable again: healthy again
        check(replica)
    finally:
        service.stop(0.0)


def test_build_app_reserves_a_gpu_for_a_cuda_replica():
    """``build_app`` with a Serve config that has no ``deployments`` entry (README: the bracketed defaults of
    replica_options apply): ``device: cuda`` sizes the replica's concurrency for a GPU batch, so it must also ask Ray
    for the GPU; with num_gpus 0 Ray reserves none, packs replicas onto one device (or onto a node without one, where
    a cuda replica fails to start) and its autoscaler never adds a GPU node for a new replica."""
    deployment = ray_serve.build_app({"device": "cuda"})
    options = deployment._bound_deployment.ray_actor_options
    assert options["num_gpus"] == 1
    assert ray_serve.build_app({"device": "cpu"})._bound_deployment.ray_actor_options["num_gpus"] == 0
    # the explicit arguments of `certserve serve --replicas N` still win
    assert replica_options(Settings(device="cuda"), replicas=2, cpus=1, gpus=0.5)["ray_actor_options"]["num_gpus"] == 0.5


def test_replicas_keep_certserve_threads_from_the_environment(monkeypatch):
    """``CERTSERVE_THREADS=1 certserve serve --replicas 2``: every setting is also a CERTSERVE_ variable and a flag
    overrides the variable, not a computed default. run_local filled ``threads`` with cores // replicas whenever the
    command line gave none, so the replicas got that value as an explicit argument and the variable was ignored."""
    captured = {}

    def capture(args, **kwargs):
        captured.update(args=args, **kwargs)
        raise _Broken  # stop before Serve starts

    import ray

    monkeypatch.setattr(os, "environ", {**os.environ, "CERTSERVE_THREADS": "1"})  # run_local's setdefaults stay here
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    monkeypatch.setattr(ray_serve, "build_deployment", capture)
    with pytest.raises(_Broken):
        ray_serve.run_local({"device": "cpu"}, replicas=2, host="127.0.0.1", port=0)
    assert captured["args"]["threads"] == 1, captured["args"]
    assert captured["cpus"] == 4.0

    captured.clear()
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "CERTSERVE_THREADS"})
    with pytest.raises(_Broken):
        ray_serve.run_local({"device": "cpu"}, replicas=2, host="127.0.0.1", port=0)
    assert captured["args"]["threads"] == 4  # no variable, no flag: the replica's share of the cores


@pytest.mark.parametrize("supplied", [[b"a" * 65], [b""], ["café".encode()], [b"first", b"second"]])
def test_the_request_id_header_is_the_one_the_answer_carries(supplied):
    """Single process: an X-Request-ID the app does not echo (over 64 characters, empty, not printable ASCII) is
    replaced by a fresh id, sent both in the header and in the body; with the header given twice the app uses one.
    Behind Ray, Ray's RequestIdMiddleware (in the proxy and in each replica's direct-ingress listener, before the
    callback's middlewares, as Ray chains them here) echoed the client's raw header while ReplicaHeader dropped the
    app's: the response's X-Request-ID differed from the error's (or certificate's) request_id and from the id in the
    replica's logs, audit record and signature."""
    from fastapi.testclient import TestClient
    from ray.serve._private.http_util import _apply_middlewares

    from server.app import create_app

    app = create_app(Settings(threads=1))  # no lifespan: the 404 below needs no service
    app.add_middleware(ray_serve.ReplicaHeader, replica="r1")
    client = TestClient(_apply_middlewares(app, ray_serve.proxy_middlewares()))
    headers = [("x-request-id", value) for value in supplied]
    r = client.get("/no-such-route", headers=headers)
    assert r.status_code == 404 and r.headers.get("x-certserve-replica") == "r1"
    body_id = r.json()["error"]["request_id"]
    assert r.headers.get_list("x-request-id") == [body_id]
    if len(supplied) == 2:
        assert body_id.encode() in supplied
    r = client.get("/no-such-route", headers={"X-Request-ID": "trace-42"})  # an echoable id is kept as sent
    assert r.headers.get_list("x-request-id") == ["trace-42"] == [r.json()["error"]["request_id"]]
