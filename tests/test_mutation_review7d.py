"""Mutation audit, round 7d: scale-out on Ray Serve. The replica (server.ray_serve.CertserveDeployment: its settings,
service, app, metrics bridge, health probe and shutdown), the deployment options it is sized with
(``replica_options``, ``build_deployment``), ``certserve serve --replicas N`` (``run_local``, with Ray and Serve
replaced by stand-ins), Ray's proxy middleware (server.ray_proxy.ProxyErrors: JSON 503s, one request id; its tests
are in tests/test_mutation_review7d_proxy.py) and the deploy configs checked against the code (deploy/ray,
deploy/kuberay).

Each test names the bug it guards against (injected by editing the code or a config once, in a private clone, never
committed) and was run against it: it failed with the bug and passes without it. 105 mutants: 46 caught by the
existing fast tests, 3 equivalent (a zero GPU share either way, ``whole <= 1`` for whole GPU counts, ``serve.run``'s
default ``blocking=False`` made explicit), and the 56 others each caught by a test here. No test starts a Ray cluster: the
replica class is built as Serve builds it (its constructor, then ``__serve_build_asgi_app__``) with Serve's replica
context and metrics API replaced by stand-ins; each test takes a few seconds at most.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

import yaml  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client import CollectorRegistry, Counter, Histogram  # noqa: E402

from server import ray_serve  # noqa: E402
from server.app import readiness  # noqa: E402
from server.ray_serve import (DEREGISTRATION_S, CertserveDeployment, MetricsBridge,  # noqa: E402
                              build_deployment, ingress_environment, replica_options)
from server.settings import Settings  # noqa: E402
from tests.deploy_helpers import RAYSERVICE_YAML, ROOT, load  # noqa: E402

SERVE_YAML = ROOT / "deploy" / "ray" / "serve.yaml"
REPLICA_ID = "r7d"


class FakeGauge:
    """Ray Serve's metrics.Gauge as MetricsBridge uses it; refuses tags it was not declared with, as Ray's does."""

    made: list[FakeGauge] = []

    def __init__(self, name, description="", tag_keys=()):
        self.name, self.tag_keys, self.values = name, tuple(tag_keys), {}
        FakeGauge.made.append(self)

    def set(self, value, tags=None):
        tags = tags or {}
        if set(tags) != set(self.tag_keys):
            raise ValueError(f"{self.name}: tags {sorted(tags)} not the declared {self.tag_keys}")
        self.values[tuple(sorted(tags.items()))] = value


@pytest.fixture
def fake_gauges(monkeypatch):
    FakeGauge.made = []
    monkeypatch.setattr(ray_serve.serve_metrics, "Gauge", FakeGauge)
    return FakeGauge.made


def _user_class():
    """The replica class as written (serve.ingress wraps it in an async-constructing subclass)."""
    return CertserveDeployment.func_or_class.__mro__[1]


# Serve awaits a replica's async __del__ itself; the garbage collector's call of it here would only warn
_Replica = type("_Replica", (_user_class(),), {"__del__": lambda self: None})


@pytest.fixture
def build_replica(monkeypatch, fake_gauges):
    """``build(args)``: a replica built as Serve builds one (constructor, then the ASGI app), without Ray."""
    monkeypatch.setattr(ray_serve.serve, "get_replica_context",
                        lambda: SimpleNamespace(replica_id=SimpleNamespace(unique_id=REPLICA_ID)))
    monkeypatch.setattr(ray_serve, "freeze_startup_heap", lambda: None)  # gc.freeze: not in a test process
    built = []

    def build(args: dict):
        replica = object.__new__(_Replica)
        _user_class().__init__(replica, args)
        built.append(replica)
        return replica, replica.__serve_build_asgi_app__()

    yield build
    for replica in built:
        if getattr(replica, "_bridge", None) is not None:
            replica._bridge._stop.set()
        replica._service.stop(0.0)


def _image() -> bytes:
    from calibration.data import load_fashion_mnist
    from tests.ray_cluster_helpers import png

    return png(load_fashion_mnist().x_test[0])


# ------------------------------------------------------------------------------------------------- the replica
def test_a_replica_is_started_and_ready_before_serve_routes_to_it(build_replica):
    """Mutant: the replica's constructor no longer starts its service (``self._service.start()`` dropped): Serve
    routes to a replica once its constructor returns, and that replica answered /readyz 503 engine_down and refused
    every certification (its health probe failed only 3 probes later)."""
    replica, app = build_replica({"threads": 1})
    assert replica._service.alive
    with TestClient(app) as client:
        r = client.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.headers["x-certserve-replica"] == REPLICA_ID


def test_a_replica_runs_with_its_own_settings_and_audit_log(build_replica, tmp_path):
    """Mutants: the app built over the settings' defaults instead of the replica's (``create_app(Settings(), ...)``:
    no API keys, other limits), the replica's shared audit log (``replica_settings`` not applied), the service built
    without the metrics observer (engine series stuck at 0): a replica must run what the single-process server runs
    with the same settings."""
    audit = tmp_path / "audit.jsonl"
    replica, app = build_replica({"threads": 1, "api_keys": ["k1"], "audit_log": str(audit), "max_batch_images": 3})
    own_audit = tmp_path / f"audit.replica-{REPLICA_ID}.jsonl"
    assert replica._settings.audit_log == str(own_audit)
    with TestClient(app) as client:
        files = {"image": ("x.png", _image(), "image/png")}
        r = client.post("/certify", files=files)
        assert r.status_code == 401, r.text  # the replica's api_keys
        assert r.headers["x-certserve-replica"] == REPLICA_ID
        r = client.post("/certify", files=files, data={"mode": "sequential", "max_samples": "2000"},
                        headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200, r.text
        assert r.headers["x-certserve-replica"] == REPLICA_ID
        assert own_audit.exists() and r.json()["request_id"] in own_audit.read_text()
        assert not audit.exists()
        metrics = client.get("/metrics", headers={"Authorization": "Bearer k1"}).text
        processed = [line for line in metrics.splitlines() if line.startswith("certserve_samples_processed_total ")]
        assert processed and float(processed[0].split()[1]) > 0, processed


def test_a_replica_bridges_its_metrics_and_stops_cleanly(build_replica, fake_gauges):
    """Mutants: the metrics bridge built but not started (no certserve series in Ray's exporter), ``__del__`` not
    marking the app draining, stopping the engine without the drain budget, or leaving the bridge running."""
    replica, app = build_replica({"threads": 1})
    assert replica._bridge is not None and replica._bridge._thread.is_alive()
    stops = []
    real_stop = replica._service.stop
    replica._service.stop = lambda seconds: (stops.append(seconds), real_stop(seconds))
    asyncio.run(_user_class().__del__(replica))
    assert app.state.draining and readiness(app.state) == "draining"
    assert stops == [replica._settings.drain_seconds] == [20.0]
    assert replica._bridge._stop.is_set()
    assert any(g.name == "certserve_ready" for g in fake_gauges)  # stop() copies the last values


def test_del_of_a_replica_whose_constructor_failed_half_way():
    """Mutant: ``__del__`` touches ``self._app`` unconditionally: Serve also calls it when the constructor failed
    (a bad bundle) and it raised AttributeError instead of stopping what exists."""
    stop = _user_class().__del__
    replica = object.__new__(_Replica)
    replica._replica = "half"
    asyncio.run(stop(replica))  # nothing built: nothing to stop, no error
    stopped = []
    replica._service = SimpleNamespace(stop=stopped.append)
    replica._settings = Settings()
    asyncio.run(stop(replica))
    assert stopped == [20.0]


# ------------------------------------------------------------------------------------------ the metrics bridge
def _registry():
    registry = CollectorRegistry()
    requests = Counter("certserve_requests", "requests", ["method"], registry=registry)
    latency = Histogram("certserve_latency_seconds", "latency", buckets=(0.1, 1.0), registry=registry)
    return registry, requests, latency


def test_the_metrics_bridge_copies_every_sample_with_its_labels(fake_gauges):
    """Mutants: gauges declared without tag keys (every set() refused: no certserve series at all), a constant in
    place of the sample's value, ``*_created`` timestamps exported as gauges."""
    registry, requests, latency = _registry()
    requests.labels("surrogate").inc(3)
    latency.observe(0.5)
    MetricsBridge(registry).copy_once()
    gauges = {g.name: g for g in fake_gauges}
    assert gauges["certserve_requests_total"].values == {(("method", "surrogate"),): 3.0}
    assert gauges["certserve_latency_seconds_bucket"].values[(("le", "1.0"),)] == 1.0
    assert gauges["certserve_latency_seconds_bucket"].values[(("le", "0.1"),)] == 0.0
    assert gauges["certserve_latency_seconds_sum"].values[()] == 0.5
    assert not [name for name in gauges if name.endswith("_created")]


def test_the_metrics_bridge_keeps_copying_after_a_failure(fake_gauges, monkeypatch):
    """Mutants: the copy loop's condition inverted (it never copies while running), an exception in one copy ending
    the thread (a metrics hiccup must not stop the bridge), ``stop()`` without a last copy."""
    registry, requests, _ = _registry()
    bridge = MetricsBridge(registry, interval=0.02)
    calls = []
    real = bridge.copy_once

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("Ray's metrics agent is not up yet")
        real()

    monkeypatch.setattr(bridge, "copy_once", flaky)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray_serve.log, "exception", lambda *a, **k: None)
        bridge.start()
        deadline = time.monotonic() + 5
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) >= 3 and bridge._thread.is_alive()
        monkeypatch.setattr(bridge, "copy_once", real)
        requests.labels("sequential").inc()
        bridge.stop()
        bridge._thread.join(timeout=5)
    gauges = {g.name: g for g in fake_gauges}
    assert gauges["certserve_requests_total"].values[(("method", "sequential"),)] == 1.0


# ------------------------------------------------------------------------------------------ deployment options
def test_replica_options_size_a_gpu_replica_of_serve_replicas_n():
    """Mutant: the batch size of ``certserve serve --replicas N`` chosen from ``device`` alone: on a GPU node with
    device auto (the default) each replica got a GPU share but the CPU batch's concurrency (32, not 512), so its
    engine never filled a GPU batch."""
    options = replica_options(Settings(device="auto"), replicas=2, cpus=1.0, gpus=0.5)
    assert options["max_ongoing_requests"] == 512
    assert replica_options(Settings(device="auto"), replicas=2, cpus=1.0)["max_ongoing_requests"] == 32


def test_replica_options_bound_concurrency_and_queue():
    """Mutants: ``max_ongoing_requests`` above the engine's ``max_live_jobs`` (the router sends requests the engine
    refuses with 503 queue_full), a floor of 5 instead of 8, an unbounded router queue (``max_queued_requests: -1``),
    the autoscaling target equal to the limit (a replica is added only when every one is full)."""
    options = replica_options(Settings(device="cuda", max_live_jobs=100))
    assert options["max_ongoing_requests"] == 100
    assert options["max_queued_requests"] == 200
    assert options["autoscaling_config"]["target_ongoing_requests"] == 50
    assert replica_options(Settings(batch_size=64))["max_ongoing_requests"] == 8


def test_replica_options_give_requests_admitted_while_deregistering_time_to_end():
    """Mutants: the shutdown budget without Serve's 30 s deregistration window, or with the deadline in the wrong
    unit: Serve killed a replica while requests admitted in the window still ran (cut, answered 500 or replayed)."""
    options = replica_options(Settings(default_deadline_ms=60_000))
    assert options["graceful_shutdown_timeout_s"] >= DEREGISTRATION_S + 60.0


def test_replica_options_reserve_a_cpu_and_the_replicas_asked_for():
    """Mutants: ``num_cpus`` taken from ``threads`` alone (threads 0, the default: Ray reserves no CPU and packs any
    number of replicas on a node), ``num_replicas`` not the count asked for (``--replicas 3`` ran one)."""
    options = replica_options(Settings(threads=0))
    assert options["ray_actor_options"]["num_cpus"] >= 1
    fixed = replica_options(Settings(), replicas=3, cpus=0.5)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"]["num_cpus"] == 0.5


def test_build_deployment_hands_the_replicas_their_args():
    """Mutant: the deployment bound without the config's args (``.bind({})``): every replica ran the default
    settings (the default bundle, no signing key, no audit log, no API keys) whatever the Serve config said."""
    args = {"threads": 2, "api_keys": ["k"], "audit_log": "/var/log/certserve/audit.jsonl"}
    bound = build_deployment(args)._bound_deployment
    assert bound.init_args == (args,)


# -------------------------------------------------------------------------------------------------- ingress
def test_the_python_proxy_ingress_installs_the_json_503_middleware():
    """Mutant: the proxy callback variable set only for the HAProxy ingress: with ``--ingress proxy`` a request whose
    replica died got Ray's bare 500 instead of 503 replica_unavailable."""
    assert ingress_environment("proxy", Settings()) == {ray_serve.PROXY_CALLBACK_ENV: ray_serve.PROXY_CALLBACK}
    with pytest.raises(ValueError, match="ingress must be one of"):
        ingress_environment("nginx", Settings())


# --------------------------------------------------------------------------- certserve serve --replicas N (stubbed)
def _stub(monkeypatch, **kwargs):
    from tests.test_ray_review2 import _Stub

    return _Stub(monkeypatch, **kwargs)


def _stop_after(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, args=(os.getpid(), signal.SIGTERM))
    timer.start()
    return timer


def test_run_local_keeps_the_operators_ray_variables_and_its_own_drain_period(monkeypatch, restore_signals):
    """Mutants: run_local overwriting Ray's ingress variables the operator set (README: variables already set win),
    its 2 s draining period for its one local HAProxy dropped back to Ray's 30 s, and its private HAProxy directory
    left behind in /tmp after the command stopped."""
    from tests.test_ray_review2 import _NotServed

    monkeypatch.setenv("RAY_SERVE_HAPROXY_RETRIES", "5")
    _stub(monkeypatch)
    with pytest.raises(_NotServed):
        ray_serve.run_local({"device": "cpu"}, replicas=2, host="127.0.0.1", port=0)
    assert os.environ["RAY_SERVE_HAPROXY_RETRIES"] == "5"
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"
    private = Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
    assert private.parent == Path("/tmp") and not private.exists()


def test_run_local_refuses_a_bad_bundle_before_ray_starts(monkeypatch, restore_signals, tmp_path):
    """Mutant: the bundle check before ``ray.init`` dropped: a wrong --bundle started a Ray cluster whose replicas
    failed one after another (Serve retries them) instead of a clear error at once."""
    stub = _stub(monkeypatch)
    with pytest.raises(Exception, match="bundle|manifest|No such file"):
        ray_serve.run_local({"device": "cpu", "bundle": str(tmp_path / "missing")}, replicas=2, host="127.0.0.1",
                            port=0)
    assert "ray.init" not in stub.calls


def test_run_local_drains_then_stops_even_when_serves_shutdown_fails(monkeypatch, restore_signals):
    """SIGTERM once every replica is ready: the application is deleted first (each replica finishes its requests,
    the proxy delivers their answers), then Serve and Ray stop. Mutants: ``serve.delete`` skipped on the normal path
    (Serve's shutdown took the proxy down under the requests), the first signal raising after start-up too (it cut
    the drain short), ``ray.shutdown`` skipped when ``serve.shutdown`` fails. (A SECOND signal during the drain now
    stops at once, as uvicorn's does: tests/test_leftovers_serve.py.)"""
    import ray
    from ray import serve

    stub = _stub(monkeypatch, run=lambda *a, **kw: None)
    monkeypatch.setattr(ray._private.worker, "global_worker", SimpleNamespace(node=SimpleNamespace(
        metrics_export_port=0)))  # read by the "ready" log line

    def delete(name):
        stub.calls.append("delete-start")
        time.sleep(0.3)  # the replicas drain
        stub.calls.append("delete-end")

    def failing_shutdown():
        stub.calls.append("serve.shutdown")
        raise RuntimeError("the controller is gone")

    monkeypatch.setattr(serve, "delete", delete)
    monkeypatch.setattr(serve, "shutdown", failing_shutdown)
    timer = _stop_after(0.5)
    try:
        with pytest.raises(RuntimeError, match="controller is gone"):
            ray_serve.run_local({"device": "cpu"}, replicas=2, host="127.0.0.1", port=0)
    finally:
        timer.cancel()
    assert stub.calls[-4:] == ["delete-start", "delete-end", "serve.shutdown", "ray.shutdown"], stub.calls


# ----------------------------------------------------------------------------------------------- deploy configs
def _deployment(config: dict) -> dict:
    return config["applications"][0]["deployments"][0]


def test_serve_yaml_options_are_what_the_code_sizes_for_its_args():
    """deploy/ray/serve.yaml (and the RayService's serveConfigV2, equal to it) against ``replica_options`` for its own
    args on a GPU: mutants (made in both files) raising max_ongoing_requests above the engine's max_live_jobs (the
    router sends requests the engine refuses: 503 queue_full), an unbounded or other router queue, the autoscaling
    target at Ray's default, a shutdown budget below deregistration + default deadline, a health-check timeout that
    leaves a hung replica in the routing table, a cuda replica without a GPU reservation."""
    for config in (load(SERVE_YAML), yaml.safe_load(load(RAYSERVICE_YAML)["spec"]["serveConfigV2"])):
        app = config["applications"][0]
        settings = Settings(**app["args"])
        dep = _deployment(config)
        code = replica_options(settings, gpus=1.0 if settings.device == "cuda" else 0.0)
        for key in ("max_ongoing_requests", "max_queued_requests", "graceful_shutdown_timeout_s",
                    "health_check_period_s", "health_check_timeout_s"):
            assert dep[key] == code[key], key
        assert dep["max_ongoing_requests"] <= settings.max_live_jobs
        auto = dep["autoscaling_config"]
        assert auto["target_ongoing_requests"] == code["autoscaling_config"]["target_ongoing_requests"]
        assert auto["min_replicas"] <= auto["initial_replicas"] <= auto["max_replicas"]
        assert dep["ray_actor_options"]["num_gpus"] == code["ray_actor_options"]["num_gpus"] == 1
        assert app["args"]["threads"] <= dep["ray_actor_options"]["num_cpus"]  # no more threads than its cores


def test_rayservice_worker_pods_can_hold_every_replica_serve_may_start():
    """Mutants: worker pods with fewer CPUs than a replica reserves (no replica fits on a pod: every one pending),
    workerGroupSpecs' maxReplicas below Serve's max_replicas (replicas beyond the pods' GPUs pending for ever), the
    head taking replicas (num-cpus not 0: a replica without a GPU there, next to the controller)."""
    rs = load(RAYSERVICE_YAML)
    cluster = rs["spec"]["rayClusterConfig"]
    dep = _deployment(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    need_cpus, need_gpus = dep["ray_actor_options"]["num_cpus"], dep["ray_actor_options"]["num_gpus"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    slots = 0
    for group in cluster["workerGroupSpecs"]:
        [container] = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        cpus, gpus = float(limits["cpu"]), int(limits.get("nvidia.com/gpu", 0))
        per_pod = min(cpus // need_cpus, gpus // need_gpus if need_gpus else cpus // need_cpus)
        assert per_pod >= 1, (group["groupName"], limits)
        slots += per_pod * group["maxReplicas"]
    assert slots >= dep["autoscaling_config"]["max_replicas"]


def test_prometheus_relabelling_gives_certserve_series_their_own_names():
    """Mutant: deploy/ray/prometheus.yml's regex capturing without the ``certserve_`` prefix (the dashboard's
    certserve_* queries found nothing). Prometheus anchors the regex on the whole value."""
    config = yaml.safe_load((ROOT / "deploy" / "ray" / "prometheus.yml").read_text())
    [rule] = config["scrape_configs"][0]["metric_relabel_configs"]
    match = re.fullmatch(rule["regex"], "ray_certserve_requests_total")
    assert match and match.expand(rule["replacement"].replace("$1", r"\1")) == "certserve_requests_total"
    assert re.fullmatch(rule["regex"], "ray_serve_num_http_requests_total") is None


def test_a_signal_during_the_clean_up_of_a_failed_start_does_not_hide_its_error(monkeypatch, restore_signals):
    """Mutant: ``starting`` not cleared before the clean-up of a start-up failure: a SIGTERM arriving while Serve
    shuts down raised the stop request from the clean-up, hid the start-up error behind it and skipped the removal
    of the private HAProxy directory."""
    from ray import serve

    from tests.test_ray_review2 import _NotServed

    stub = _stub(monkeypatch)

    def shutdown():
        stub.calls.append("serve.shutdown")
        os.kill(os.getpid(), signal.SIGTERM)  # docker stop, while the failed start is cleaned up
        time.sleep(0.2)

    monkeypatch.setattr(serve, "shutdown", shutdown)
    with pytest.raises(_NotServed):
        ray_serve.run_local({"device": "cpu"}, replicas=2, host="127.0.0.1", port=0)
    assert stub.calls[-2:] == ["serve.shutdown", "ray.shutdown"], stub.calls
    assert not Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent.exists()
