"""``certserve serve``: run the app under uvicorn; SIGTERM/SIGINT -> not ready, drain in-flight work, exit 0."""

from __future__ import annotations

import gc
import logging
import os
import threading
from pathlib import Path

from server.settings import Settings

#: Ray ingresses of `certserve serve --replicas N --ingress ...` (server.ray_serve.ingress_environment); the first is
#: the default. Here, not in server.ray_serve, so that the CLI lists them without importing Ray.
INGRESSES = ("haproxy", "proxy")
#: seconds uvicorn still waits after the drain for the answers to be written before it cancels what is open
ANSWER_GRACE_SECONDS = 3


def stop_seconds(drain_seconds: float) -> int:
    """How long SIGTERM -> exit may take (uvicorn's graceful-shutdown timeout): the drain, then the answers' grace.
    A supervisor's kill timeout must exceed it (``docker stop``: 10 s by default; the image sets its drain to fit)."""
    return int(drain_seconds) + ANSWER_GRACE_SECONDS


def freeze_startup_heap() -> None:
    """Move every object alive after start-up (bundle, sessions, imported modules: ~130k objects) out of the cyclic
    garbage collector's reach (``gc.freeze``), so that a full collection scans only what requests allocate.

    Measured on the 2-core machine (bursts of 20 surrogate requests): without it, a generation-2 collection paused
    the event loop for up to ~120 ms every few seconds, which was the whole p99 of the burst row in
    docs/benchmarks.md (b). Frozen objects are still freed by reference counting; only cycles among them would stay
    (start-up state lives as long as the process anyway)."""
    gc.collect()
    gc.freeze()


def _draining_server_class():
    import uvicorn  # imported here: only serving needs it, not the other subcommands

    class DrainingServer(uvicorn.Server):
        """Flip readiness off the moment a shutdown signal arrives, before uvicorn stops accepting connections."""

        app_state = None

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)  # runs the app's lifespan start-up (bundle, engine) first
            freeze_startup_heap()

        def handle_exit(self, sig, frame) -> None:
            if self.app_state is not None:
                self.app_state.draining = True
                # The engine's drain starts now, not when uvicorn runs the lifespan shutdown: uvicorn cancels the
                # requests still open drain_seconds + 3 s after the signal, and by then each must have its
                # certificate so far (the engine answers them at drain_seconds). Requests already in flight may still
                # submit their jobs until then (accept). A thread: not under a signal handler.
                service, drain = self.app_state.service, self.app_state.settings.drain_seconds
                if service is not None:
                    threading.Thread(target=service.engine.stop, args=(drain,), kwargs={"wait": False, "accept": True},
                                     name="certserve-drain", daemon=True).start()
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals after shutdown (exit 143 for SIGTERM); a drained shutdown is a
            # clean exit, so forget them and let run() return normally.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return DrainingServer, uvicorn


def http_protocol(app, settings: Settings) -> type:
    """uvicorn's HTTP protocol class with the header phase bounded (server.connections): a connection that sends no
    complete request line and headers within CERTSERVE_BODY_TIMEOUT_SECONDS, or more than 64 KiB of them, is
    answered and closed instead of holding its descriptor and buffers for the life of the process."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from server.connections import guarded_protocol

    metrics = getattr(app.state, "metrics", None)
    return guarded_protocol(AutoHTTPProtocol, timeout=settings.body_timeout_seconds,
                            idle_timeout=settings.keep_alive_seconds,
                            on_reject=None if metrics is None else metrics.observe_rejected)


def add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="start the certification server (settings also from CERTSERVE_* variables)")
    p.add_argument("--bundle", default=None, help="bundle directory (default: the embedded Fashion-MNIST bundle)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-level", default=None)
    p.add_argument("--replicas", type=int, default=1,
                   help="N > 1: a local Ray Serve application with N replicas, one engine each (needs certserve[ray])")
    p.add_argument("--ingress", choices=INGRESSES, default=None,
                   help="with --replicas: Ray's HAProxy ingress (default; replays a dead replica's requests on "
                        "another) or Serve's Python proxy (answers them 503 + Retry-After)")
    p.add_argument("--ray-metrics-port", type=int, default=None,
                   help="with --replicas: the port of Ray's Prometheus endpoint (default: Ray picks one)")
    p.set_defaults(func=run_serve)


def check_configuration(settings: Settings, *, replicas: int = 1):
    """The configuration errors a user makes, found before uvicorn (or Ray) starts, as one ``ValueError`` line
    (``certserve: error: ...``, exit 2) instead of a start-up traceback: the bundle loads and verifies, a ``cuda``
    device can run, the signing keys load, the audit log can be appended to (with replicas, each writes its own file
    in the log's directory). Returns the verified :class:`models.bundle.Bundle` (it holds the model bytes whose
    sha256 was checked), which the app then serves instead of loading and verifying it a second time; the app's own
    start-up opens the log."""
    bundle = Path(settings.bundle)
    if not bundle.is_dir():
        raise ValueError(f"bundle directory {bundle} {'is not a directory' if bundle.exists() else 'does not exist'}")
    from models.bundle import load_bundle

    # the whole verification (schema, every artifact present and its sha256, shapes): a partial or corrupt bundle is
    # one BundleError line here, not a traceback from the app's start-up (exit 3)
    verified = load_bundle(bundle)
    if settings.device == "cuda":
        _check_cuda()
    if settings.signing_key:
        from certification.signing import Signer

        Signer.from_paths(settings.signing_key)  # SigningKeyError (a ValueError) names the file and the problem
    if settings.audit_log:
        audit = Path(settings.audit_log).resolve()  # a symlink: its target, as certification.audit.AuditLog opens it
        if replicas == 1:
            _check_appendable(audit)
        else:
            _check_creatable_in(audit.parent, audit)
    return verified


def _check_cuda() -> None:
    """``device: cuda`` can run here (models.backends.cuda_unavailable): else the engine's backend would fail in the
    app's start-up with a traceback."""
    from models.backends import cuda_unavailable

    if (reason := cuda_unavailable()) is not None:
        raise ValueError(f"device (CERTSERVE_DEVICE) is cuda, but {reason}; use auto or cpu")


def _check_appendable(path: Path) -> None:
    """``path`` can be opened for append, or created; creates nothing itself."""
    if not path.exists():
        _check_creatable_in(path.parent, path)
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError as exc:
        raise ValueError(f"audit log {path} cannot be opened for append: {exc.strerror or exc}") from None


def _check_creatable_in(directory: Path, path: Path) -> None:
    """A file can be created in ``directory``, making its missing parents (as the audit log does)."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir():
        raise ValueError(f"audit log {path} cannot be created: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"audit log {path} cannot be created: directory {directory} is not writable")


def run_serve(args) -> int:
    overrides = {k: v for k, v in vars(args).items()
                 if k in Settings.model_fields and v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    replicas, metrics_port, ingress = (getattr(args, "replicas", 1), getattr(args, "ray_metrics_port", None),
                                       getattr(args, "ingress", None))
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1; got {replicas}")
    if replicas == 1 and (ingress is not None or metrics_port is not None):
        raise ValueError("--ingress and --ray-metrics-port apply to a Ray Serve application: add --replicas N (N > 1)")
    if metrics_port is not None and not 0 <= metrics_port <= 65535:  # else Ray's node timed out starting (traceback)
        raise ValueError(f"--ray-metrics-port must be a port, 0-65535 (0: Ray picks one); got {metrics_port}")
    if replicas > 1 and settings.port == 0:  # else HAProxy failed to start (a traceback), or the Python proxy
        # listened on a port nobody was told (Serve does not report it: the ready line said port 0)
        raise ValueError("--port 0 (CERTSERVE_PORT=0, any free port) cannot be used with --replicas N: Ray's HAProxy "
                         "ingress refuses to bind port 0 and Serve's Python proxy does not report the port it got; "
                         "give a fixed port")
    bundle = check_configuration(settings, replicas=replicas)
    if replicas > 1:
        try:
            from server.ray_serve import run_local  # Ray is an optional extra: imported only here
        except ImportError as exc:
            raise ValueError(f"--replicas needs Ray Serve: pip install 'certserve[ray]' ({exc})") from None
        replica_args = {k: v for k, v in overrides.items() if k not in ("host", "port")}
        return run_local(replica_args, replicas=replicas, host=settings.host, port=settings.port,
                         metrics_port=metrics_port, ingress=ingress or INGRESSES[0])
    from server.app import create_app
    from server.connections import MAX_HEADER_BYTES

    server_class, uvicorn = _draining_server_class()
    app = create_app(settings, bundle=bundle)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=stop_seconds(settings.drain_seconds), lifespan="on",
                            timeout_keep_alive=settings.keep_alive_seconds,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES,  # h11 (no httptools): not its 16 KiB
                            http=http_protocol(app, settings))
    server = server_class(config)
    server.app_state = app.state
    server.run()
    # uvicorn exits non-zero itself when start-up (e.g. bundle verification) fails
    return 0 if server.started else 3
