"""Scale-out on Ray Serve: one certification service (bundle + batching engine) per replica, behind the same app.

Each replica is one Ray actor process that builds its :class:`CertificationService` in the constructor (verify the
bundle, start and warm up the engine) and then serves :func:`server.app.create_app` over that service through
``@serve.ingress``: same routes, schemas and error contract as ``certserve serve``. The engine batches the requests of
its own replica only, so ``max_ongoing_requests`` is sized to let it fill its batches (Ray's default of 5 would not).

- ``check_health`` follows the engine's liveness: a replica whose engine died is replaced by Serve.
- Shutdown (scale-down, redeploy, ``serve shutdown``, SIGTERM of ``certserve serve --replicas N``): Serve keeps the
  replica reachable for its deregistration window (30 s behind HAProxy), stops routing to it, waits for its ongoing
  requests and only then calls ``__del__``, which stops the engine. Unlike SIGTERM of one process, no drain cuts the
  requests short: each runs to its own end (at the latest its deadline), so ``graceful_shutdown_timeout_s`` covers
  the window plus the default deadline (:func:`replica_options`); a request with a longer deadline still running when
  Serve kills the replica is replayed on another one by HAProxy (a new certificate) or retried by CertserveClient.
  ``certserve serve --replicas N`` handles signals as uvicorn does (server.ray_signals): the first SIGTERM/SIGINT
  drains as above and exits 0; a second one while that drain runs stops Ray at once (its replicas, proxies and
  HAProxy), cutting the requests still in flight, and exits 1.
- Every response carries ``X-Certserve-Replica`` (the Serve replica id, also the ``replica`` label of its metrics).
- Metrics: :class:`MetricsBridge` copies the replica's prometheus-client registry into Ray's metrics API, so Ray's
  metrics endpoint on every node exports ``ray_certserve_*`` series with ``application``/``deployment``/``replica``
  labels next to Ray's own ``ray_serve_*`` (deploy/ray/prometheus.yml strips the ``ray_`` prefix for the dashboard).
- Ingress (:func:`ingress_environment`, variables set where Ray starts): by default Ray's HAProxy ingress, which
  forwards to HTTP listeners in the replicas and replays on another replica a request whose replica died before
  answering; or Serve's Python proxy, where :func:`proxy_middlewares` turns the proxy's own bare 500 for such a request
  into the JSON envelope ``503 replica_unavailable`` with ``Retry-After``.

Entry points: :func:`build_app` (``import_path`` of deploy/ray/serve.yaml, args = settings fields) and
:func:`run_local` (``certserve serve --replicas N``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path

from ray import serve
from ray.serve import metrics as serve_metrics

from models.bundle import load_bundle
from models.defaults import default_batch_size
from server.app import build_service, create_app
from server.errors import error_bytes
from server.metrics import Metrics
from server.ray_proxy import REPLICA_HEADER, ProxyErrors
from server.ray_signals import FORCED_EXIT, ForceStop, StopRequested, StopSignals
from server.serve import INGRESSES, freeze_startup_heap
from server.settings import Settings

log = logging.getLogger("certserve")
APP_NAME = "certserve"
DEPLOYMENT_NAME = "Certserve"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "server.ray_serve:proxy_middlewares"
NOT_ARGS = {"host", "port"}  # the Serve proxy listens, per http_options of the Serve config
#: HAProxy replays (L7 retries) only a request it holds whole in one buffer: the largest body the app accepts plus
#: room for the request line and headers, up to a cap. Larger buffers cost latency on every request (measured on 2
#: cores at 200 req/s: p50 3.9 / 4.1 / 5.0 / 13 ms with 16 KiB / 256 KiB / 1 MiB / 4 MiB buffers; 16-256 KiB alike).
HAPROXY_HEADER_ROOM = 64 * 1024
HAPROXY_MAX_BUFSIZE = 256 * 1024
#: Serve keeps a stopping replica behind HAProxy reachable this long so that load balancers can deregister it
#: (Ray's RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S default); requests admitted then still have to end.
DEREGISTRATION_S = 30.0
#: Replays of one request at most: enough to get past a dead replica, and a request that itself kills replicas (a
#: crash bug) takes at most this many more with it.
HAPROXY_RETRIES = 2
#: A sequential job asks the engine for tens to a few hundred samples per step (its next checkpoint), so a batch of
#: B samples is full with about B / 32 jobs in flight: the replica's concurrency limit.
SAMPLES_PER_ONGOING_REQUEST = 32


def settings_from_args(args: dict | None) -> Settings:
    """The replica settings of a Serve config's ``args`` (fields of :class:`Settings`); ValueError on an unknown key
    (Settings alone would ignore a misspelled one) or on host/port (the Serve proxy's, not the replica's)."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(Settings.model_fields) | set(args) & NOT_ARGS)
    if unknown:
        accepted = ", ".join(sorted(set(Settings.model_fields) - NOT_ARGS))
        raise ValueError(f"unknown certserve args {unknown} (host/port belong to http_options); accepted: {accepted}")
    # nor read from the environment: a replica does not listen, and a Kubernetes service link's CERTSERVE_PORT=tcp://...
    # (refused there) failed every replica and `serve --replicas N --port P`, where --port wins for one process
    return Settings(**args, **{name: Settings.model_fields[name].default for name in NOT_ARGS})


def replica_settings(settings: Settings, replica: str) -> Settings:
    """Each replica appends to its own audit log (its records together; a shared one would be safe too, under the
    log's flock), next to the configured one, ``audit.jsonl`` -> ``audit.replica-<id>.jsonl``; a symlinked one is
    resolved first, as one process's log is (certification.audit) and as ``certserve serve`` checks its directory."""
    if not settings.audit_log:
        return settings
    path = Path(settings.audit_log).resolve()
    return settings.model_copy(update={"audit_log": str(path.with_name(f"{path.stem}.replica-{replica}{path.suffix}"))})


def replica_options(settings: Settings, *, replicas: int | None = None, cpus: float | None = None,
                    gpus: float = 0.0) -> dict:
    """Deployment options sized to the engine: concurrency that fills a batch, half of it as the autoscaling target,
    a shutdown budget that lets requests with the default deadline, admitted during Serve's deregistration window,
    end on their own. The Serve config's ``deployments`` section overrides any of them."""
    capacity = settings.batch_size or default_batch_size("cuda" if gpus or settings.device == "cuda" else "cpu")
    ongoing = max(8, min(settings.max_live_jobs, capacity // SAMPLES_PER_ONGOING_REQUEST))
    options = {
        "max_ongoing_requests": ongoing,
        "max_queued_requests": 2 * ongoing,
        "graceful_shutdown_timeout_s": DEREGISTRATION_S + settings.default_deadline_ms / 1e3 + 10,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 5,
        "health_check_timeout_s": 10,
        "ray_actor_options": {"num_cpus": cpus if cpus is not None else max(1, settings.threads), "num_gpus": gpus},
    }
    if replicas is None:
        options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": ongoing // 2}
    else:
        options["num_replicas"] = replicas
    return options


def build_app(args: dict) -> serve.Application:
    """The application builder of deploy/ray/serve.yaml (``import_path: server.ray_serve:build_app``; Ray calls it
    with the config's ``args``, which are settings fields). Deployment options come from the config; where it gives
    none, :func:`replica_options`, with one GPU per replica for ``device: cuda`` (else Ray would reserve none)."""
    return build_deployment(args, gpus=1.0 if settings_from_args(args).device == "cuda" else 0.0)


def build_deployment(args: dict | None, *, replicas: int | None = None, cpus: float | None = None,
                     gpus: float = 0.0) -> serve.Application:
    """The bound deployment with options sized to the settings (:func:`replica_options`)."""
    settings = settings_from_args(args)
    options = replica_options(settings, replicas=replicas, cpus=cpus, gpus=gpus)
    return CertserveDeployment.options(**options).bind(dict(args or {}))


class ReplicaHeader:
    """Outermost middleware of a replica's app: ``X-Certserve-Replica`` on every response (errors included).

    Ray's proxy adds ``X-Request-ID`` itself (the same id, which the app took from the request), so the app's copy
    is dropped here instead of being sent twice."""

    def __init__(self, app, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message["headers"] = [*headers, (REPLICA_HEADER, self.replica)]
            await send(message)

        await self.app(scope, receive, send_tagged)


class MetricsBridge:
    """Copy a prometheus-client registry into Ray Serve gauges every ``interval`` seconds (a daemon thread).

    One gauge per exported sample name (``certserve_requests_total``, ``..._bucket`` with its ``le`` label, ...),
    set to the sample's current value; Ray adds the application/deployment/replica labels and exports them as
    ``ray_<name>`` on the node's metrics port. Counters and histogram buckets stay cumulative, so ``rate()`` and
    ``histogram_quantile()`` work on them unchanged; a replacement replica starts new series under its own label.
    Values lag by up to ``interval`` plus Ray's report interval (a few seconds)."""

    def __init__(self, registry, interval: float = 2.0):
        self.registry, self.interval = registry, interval
        self._gauges: dict[str, serve_metrics.Gauge] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="certserve-metrics-bridge", daemon=True)

    def start(self) -> MetricsBridge:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.copy_once()  # the last values before the replica goes away

    def copy_once(self) -> None:
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                gauge = self._gauges.get(sample.name)
                if gauge is None:
                    gauge = self._gauges[sample.name] = serve_metrics.Gauge(
                        sample.name, description=family.documentation, tag_keys=tuple(sorted(sample.labels)))
                gauge.set(float(sample.value), tags={k: str(v) for k, v in sample.labels.items()})

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.copy_once()
            except Exception:  # a metrics hiccup must never take the replica down
                log.exception("copying metrics to Ray failed")


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class CertserveDeployment:
    """One replica: the certification service is built (and warmed up) here, before Serve routes any request."""

    def __init__(self, args: dict):
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._settings = replica_settings(settings_from_args(args), self._replica)
        logging.getLogger("certserve").setLevel(self._settings.log_level.upper())
        self._metrics = Metrics()
        # verifies the bundle's hashes and shapes: a bad bundle fails the replica's start (Serve retries, then reports)
        self._service = build_service(self._settings, observer=self._metrics)
        self._service.start()
        freeze_startup_heap()  # as `certserve serve` does after start-up (server.serve)
        self._app = None
        self._bridge: MetricsBridge | None = None
        log.info("certserve replica %s ready: bundle %s, sampler %s", self._replica, self._service.manifest.name,
                 self._service.engine.sampler.backend.name)

    def __serve_build_asgi_app__(self):
        app = create_app(self._settings, service=self._service, metrics=self._metrics)
        app.add_middleware(ReplicaHeader, replica=self._replica)  # added last: outermost, sees every response
        self._bridge = MetricsBridge(self._metrics.registry).start()
        self._app = app
        return app

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy, and Serve replaces it (after 3 failed
        probes in a row). Fails while the engine is down or the audit log is unwritable: /readyz reports both, but
        behind Serve nothing routes on /readyz, and such a replica refuses every certification request (503)."""
        if not self._service.alive:
            raise RuntimeError(f"replica {self._replica}: the certification engine is not running")
        if not self._service.sealer.audit_available():
            raise RuntimeError(f"replica {self._replica}: the audit log cannot be written (503 audit_unavailable)")

    async def __del__(self):
        """Serve has stopped routing here and waited for the ongoing requests (module docstring): stop the engine,
        whose drain then finds nothing left. (Also called when the constructor failed half-way: stop only what
        exists.)"""
        if getattr(self, "_app", None) is not None:
            self._app.state.draining = True
        if getattr(self, "_service", None) is not None:
            await asyncio.to_thread(self._service.stop, self._settings.drain_seconds)
        if getattr(self, "_bridge", None) is not None:
            self._bridge.stop()
        log.info("certserve replica %s stopped", getattr(self, "_replica", "?"))


def proxy_middlewares() -> list:
    """Ray's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=server.ray_serve:proxy_middlewares``)."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrors)]


def ingress_environment(ingress: str, settings: Settings) -> dict[str, str]:
    """The variables that configure Ray's ingress for ``ingress`` ("haproxy" or "proxy"). They act where Ray starts
    (``ray start``, ``ray.init``; its processes inherit them): deploy/ray/ray.env and deploy/kuberay/rayservice.yaml
    carry the same values (a test keeps them equal).

    - Both: Serve's Python proxy (the whole ingress with "proxy", HAProxy's fallback server with "haproxy") answers
      a request whose replica died mid-flight with 503 + Retry-After in the JSON envelope (:class:`ProxyErrors`).
    - "haproxy": Ray's HAProxy ingress forwards to HTTP listeners in the replicas (about a quarter of the Python
      proxy's CPU per request; docs/benchmarks.md (h)). A request whose replica closed the connection without an
      answer (it died), or could not be reached, is replayed on another replica (``retry-on``, at most
      :data:`HAPROXY_RETRIES` times; Ray's config sets ``option redispatch``). Replaying is sound: an unanswered
      request certified nothing, and the replay draws fresh noise. HAProxy replays only what it holds whole in one
      buffer: ``tune.bufsize`` covers ``max_body_bytes`` + header room up to :data:`HAPROXY_MAX_BUFSIZE` (192 KiB of
      body: any single image of ordinary size). A larger request whose replica dies before answering gets HAProxy's
      bare 500; raise RAY_SERVE_HAPROXY_TUNE_BUFSIZE (at a latency cost) or use "proxy" where that matters. A request
      that reaches a replica in its last milliseconds can still get HAProxy's bare 500 or a closed connection
      (tests/test_ray_serve.py: 1-2 of the ~4 requests a killed replica held in 3 of 7 runs, more on a busy machine);
      server.client retries those.
      Not with Ray's throughput mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, about a fifth less CPU per request):
      with it, or with ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`` alone, HAProxy sent some requests of a
      killed replica back as a 500 or a cut connection instead of replaying them (tests/test_ray_serve.py failed in
      about two of three runs; without it the same race is rarer, see above).
    """
    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {', '.join(INGRESSES)}; got {ingress!r}")
    env = {PROXY_CALLBACK_ENV: PROXY_CALLBACK}
    if ingress == "haproxy":
        env.update({
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response",
            "RAY_SERVE_HAPROXY_RETRIES": str(HAPROXY_RETRIES),
            "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(min(settings.max_body_bytes + HAPROXY_HEADER_ROOM,
                                                      HAPROXY_MAX_BUFSIZE)),
        })
    return env


def haproxy_private_files(directory: str) -> dict[str, str]:
    """HAProxy's config, admin socket and server state default to the fixed /tmp/haproxy-serve, shared by every Ray
    cluster on the machine; a local cluster keeps them in its own directory (Ray puts each file in a subdirectory
    named after the node id: ``<directory>/<node id>/admin.sock``)."""
    return {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{directory}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{directory}/admin.sock",
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{directory}/metrics.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": directory,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{directory}/server-state"}


def gpus_per_replica(gpus: float, replicas: int) -> float:
    """The GPU share of each of ``replicas`` replicas on a node with ``gpus`` GPUs: one each where there are enough,
    else 1/k of one GPU with k = the replicas each GPU must hold (rounded up). Ray places a fractional request on ONE
    GPU, so ``gpus / replicas`` (2 GPUs, 3 replicas: 2/3 each) left a replica that fits on no GPU: it stayed pending
    and ``certserve serve --replicas 3`` never became ready."""
    whole = math.floor(gpus)
    if gpus <= 0 or replicas < 1:
        return 0.0
    if whole < 1:  # a node with a fraction of one GPU: all replicas share it
        return gpus / replicas
    return 1.0 / math.ceil(replicas / whole)


def run_local(args: dict, *, replicas: int, host: str, port: int, metrics_port: int | None = None,
              ingress: str = INGRESSES[0]) -> int:
    """``certserve serve --replicas N``: a local Ray cluster (this machine's cores, no dashboard), N replicas behind
    ``ingress`` (:func:`ingress_environment`) on host:port. Variables already set in the environment win over these
    defaults. SIGTERM/SIGINT (server.ray_signals): the first -> Serve drains the replicas, everything stops, returns
    0; a second one during that drain -> Ray stops at once without waiting for it, returns ``FORCED_EXIT`` (1)."""
    import ray

    settings = settings_from_args(args)
    load_bundle(settings.bundle)  # fail fast and clearly, before any Ray process starts
    private = tempfile.mkdtemp(prefix="hap", dir="/tmp")  # short: Ray adds a 56-character node id, HAProxy's socket
    # paths must fit 97 bytes
    local = {**ingress_environment(ingress, settings), **haproxy_private_files(private),
             # one HAProxy on this machine, reloaded by Ray within a second of a replica leaving: a stopping replica
             # need not stay reachable for Ray's 30 s (meant for load balancers that learn of it later)
             "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    for key, value in local.items():
        os.environ.setdefault(key, value)  # inherited by every Ray process started below
    cores = os.cpu_count() or 1
    signals = StopSignals()
    try:
        try:
            ray.init(num_cpus=cores, include_dashboard=False, _metrics_export_port=metrics_port,
                     _node_ip_address="127.0.0.1", logging_level=logging.WARNING)  # one machine: the loopback address
            signals.install()  # after ray.init, which installs its own SIGTERM handler
            gpus = ray.cluster_resources().get("GPU", 0.0) if settings.device != "cpu" else 0.0
            # a --threads flag or CERTSERVE_THREADS wins over the replica's share of the cores
            args = {**args, "threads": settings.threads or max(1, cores // replicas)}
            app = build_deployment(args, replicas=replicas, cpus=cores / replicas,
                                   gpus=gpus_per_replica(gpus, replicas))
            serve.start(http_options={"host": host, "port": port})
            serve.run(app, name=APP_NAME, route_prefix="/")
            signals.serving()
            log.warning("certserve: %d replicas ready on http://%s:%d behind %s (Ray metrics on port %s)", replicas,
                        host, port, ingress, ray._private.worker.global_worker.node.metrics_export_port)
            while not signals.requested.wait(0.5):
                pass
            log.warning("certserve: stopping (replicas drain their ongoing requests; a second signal stops at once)")
            # delete the application first, with the proxy still up: each replica leaves the routing table,
            # finishes its ongoing requests (graceful_shutdown_timeout_s) and the proxy delivers their answers; only
            # then stop Serve
            serve.delete(APP_NAME)
        except StopRequested:  # a signal during start-up: stop everything that started
            log.warning("certserve: stopping before every replica was ready")
            try:  # the replicas already up may be answering requests (HAProxy routes to them): let them finish
                serve.delete(APP_NAME)
            except Exception:  # noqa: BLE001 (not deployed yet, or Serve not started: serve.shutdown below stops it)
                log.debug("deleting the application during start-up failed", exc_info=True)
    except ForceStop:  # a second signal during the drain: the finally below stops Ray without waiting for it
        pass
    finally:
        try:  # Serve's graceful shutdown (its replicas finish what they hold), unless a second signal forced the stop
            signals.serving()  # a first signal during this clean-up (after a start-up failure) does not cut it
            if ray.is_initialized() and not signals.forced:
                serve.shutdown()
        except ForceStop:  # a second signal while Serve shuts down
            pass
        finally:  # nothing interrupts ray.shutdown: it stops every process of the local cluster
            signals.shield()
            if ray.is_initialized():
                if signals.forced:
                    log.warning("certserve: stopping Ray now (requests still in flight are cut)")
                ray.shutdown()
            signals.restore()
            shutil.rmtree(private, ignore_errors=True)
    return FORCED_EXIT if signals.forced else 0
