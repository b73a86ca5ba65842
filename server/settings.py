"""Server settings: command-line flags override environment variables (prefix ``CERTSERVE_``), which override defaults."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from certification.config import ServiceConfig
from models.bundle import DEFAULT_BUNDLE_DIR
from smoothing.stopping import MAX_BUDGET
from models.defaults import AUTO_MAX_SAMPLES, AUTO_MIN_SURROGATE_Z, COHEN_N0, DEFAULT_ALPHA, MAX_SAMPLES


ENV_PREFIX = "CERTSERVE_"
#: CERTSERVE_ variables read elsewhere than Settings: `certserve verify`'s key set, the data set directory of the
#: calibration pipeline, and the CI / test harness's switches
OTHER_VARIABLES = frozenset(ENV_PREFIX + name for name in ("JWKS", "FASHION_MNIST_DIR", "FUZZ_FAST_CASES",
                                                           "FUZZ_FULL_CASES", "DOCKER_CACHE", "SKIP_DOCKER"))
#: Kubernetes' service links: for every Service of a pod's namespace, <NAME>_SERVICE_HOST, <NAME>_SERVICE_PORT[_<PORT
#: NAME>], <NAME>_PORT and <NAME>_PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR] (Services whose name begins with "certserve-",
#: as KubeRay's certserve-head-svc and certserve-serve-svc of deploy/kuberay, give CERTSERVE_ ones): not settings
_NAME, _PROTO = r"CERTSERVE_(?:[A-Z0-9_]+_)?", r"_\d+_(?:TCP|UDP|SCTP)"
_SERVICE_LINKS = [(re.compile(_NAME + form), kind) for form, kind in (
    ("SERVICE_HOST", "address"), ("SERVICE_PORT(?:_[A-Z0-9_]+)?", "number"), (f"PORT{_PROTO}_PROTO", "protocol"),
    (f"PORT{_PROTO}_PORT", "number"), (f"PORT{_PROTO}_ADDR", "address"), (f"PORT(?:{_PROTO})?", "url"))]


class Settings(BaseSettings):
    """Every field is also read from ``CERTSERVE_<NAME>`` (e.g. ``CERTSERVE_MAX_SAMPLES=20000``)."""

    # an error's text never holds the value given: it may be an API key (a Ray Serve replica logs the error's text)
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", hide_input_in_errors=True)

    bundle: str = Field(str(DEFAULT_BUNDLE_DIR), description="model bundle directory")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, le=1024, description="onnxruntime intra-op threads for the worker (0: all cores; at "
                         "most 1024: onnxruntime creates every one at start-up, 100000 hung it for minutes)")
    default_alpha: float = Field(DEFAULT_ALPHA, gt=0, lt=1, description="request alpha when the client sends none "
                                 "(at least 1e-15, as a request's)")
    max_samples: int = Field(MAX_SAMPLES, ge=100, le=MAX_BUDGET, description="cap on a request's sample budget (also the default)")
    auto_max_samples: int = Field(AUTO_MAX_SAMPLES, ge=100, le=MAX_BUDGET, description="budget of an auto-mode fallback that sets no max_samples")
    auto_min_surrogate_z: float = Field(AUTO_MIN_SURROGATE_Z, ge=0, le=10, allow_inf_nan=False, description=(
        "auto answers with the surrogate only where its calibrated radius is >= this many sigmas (else the "
        "per-input path, a few hundred samples); 0: whenever the surrogate certifies"))
    cohen_n0: int = Field(COHEN_N0, ge=1, description="selection samples of cohen mode")
    batch_size: int = Field(0, ge=0, description="noise samples per model call (0: 16384 on GPU, 1024 on CPU)")
    max_live_jobs: int = Field(512, ge=1, description="sampling jobs (sequential, fixed, cohen) in flight; beyond "
                               "this requests get 503 queue_full")
    sampler_idle: bool = Field(True, description="the CPU sampler's threads run under Linux's SCHED_IDLE policy: "
                               "a waking event loop or clean pass preempts them at once (false: CERTSERVE_SAMPLER_NICE)")
    sampler_nice: int = Field(10, ge=0, le=19, description="nice value added to the CPU sampler's threads where "
                              "SCHED_IDLE is off or refused, so the event loop and clean passes keep the CPU (0: same)")
    gil_switch_ms: float = Field(5.0, ge=0.05, le=100, allow_inf_nan=False, description="the process's GIL switch "
                                 "interval (Python's default, 5 ms): 0.5 may lower the surrogate's p99 under "
                                 "sequential load, depending on the machine, and raises it without "
                                 "(docs/benchmarks.md (b))")
    max_inflight_requests: int = Field(1024, ge=1, description="certification requests in flight; beyond, 503")
    default_deadline_ms: int = Field(30_000, ge=1, le=600_000, description="deadline of a sampling job (sequential, "
                                     "fixed, cohen) whose request sets none (at most a request's own limit, 600,000)")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    body_timeout_seconds: float = Field(30.0, gt=0, le=3600, description="time a client has to send its whole "
                                        "request body (from its arrival; beyond, 408 body_timeout): a trickled body "
                                        "must not hold an admission slot; also the time a connection has to send "
                                        "a request's line and headers (408 header_timeout, server.connections), and the time an answer may "
                                        "make no progress (a client that does not read it: the connection is dropped)")
    keep_alive_seconds: float = Field(75.0, gt=0, le=3600, description="how long a connection may stay idle "
                                      "after an answer before its next request starts (HTTP keep-alive): longer than "
                                      "the idle timeouts of common clients and load balancers (httpx 5 s, aiohttp "
                                      "15 s, AWS ALB and nginx upstreams 60 s), so that they close idle connections "
                                      "first; a server that closes one while a request is being sent on it makes "
                                      "that request fail (a reset) without an answer")
    max_pixels: int = Field(4096 * 4096, ge=1, description="largest decoded image (width x height) accepted")
    max_batch_images: int = Field(64, ge=1)
    drain_seconds: float = Field(20.0, ge=0, le=3600, description="SIGTERM grace period for in-flight work")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                     description="comma-separated; empty = no authentication")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("port", mode="before")
    @classmethod
    def _not_a_service_link(cls, v):
        if isinstance(v, str) and _is_url(v):  # Kubernetes sets CERTSERVE_PORT=tcp://IP:PORT for a Service "certserve"
            raise ValueError("is a Kubernetes service link (tcp://address:port, set for a Service named certserve in "
                             "the pod's namespace), not a port: set CERTSERVE_PORT in the pod's env (it wins) or "
                             "enableServiceLinks: false in its spec")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, v):
        return v.lower() if isinstance(v, str) else v

    @field_validator("default_alpha")
    @classmethod
    def _representable_alpha(cls, v):
        if v < 1e-15:  # as a request's alpha (certification.plan): the fixed-n bounds cannot hold a smaller one
            raise ValueError("must be at least 1e-15 (below, floating point cannot hold the bounds)")
        return v
    signing_key: str | None = Field(None, description="Ed25519 PEM key file, directory or comma-separated list: sign "
                                                      "every certificate (README: Verifying certificates)")
    require_signing: bool = Field(False, description="refuse to start without a signing key")
    audit_log: str | None = Field(None, description="append every certificate to this JSON-lines file before "
                                                    "answering; if it cannot be written, answer 503")
    audit_max_bytes: int = Field(100 * 2**20, ge=0, description="rotate the audit log beyond this size (0: never)")
    audit_backups: int = Field(10, ge=1, description="rotated audit log files kept (PATH.1 ... PATH.N)")
    audit_fsync: bool = Field(False, description="fsync every audit line before its certificate is answered: the "
                                                 "record then survives a power loss or host crash, not only a killed "
                                                 "process (one disk flush per certificate)")

    def service_config(self) -> ServiceConfig:
        """The certification service's part of the settings."""
        return ServiceConfig(**{name: getattr(self, name) for name in ServiceConfig.__dataclass_fields__})

    @model_validator(mode="after")
    def _signing_required(self):
        if self.require_signing and not (self.signing_key or "").strip():
            raise ValueError("CERTSERVE_REQUIRE_SIGNING is true but no signing key is configured: set "
                             "CERTSERVE_SIGNING_KEY (create one with `certserve keys generate --out DIR`)")
        return self

    @model_validator(mode="after")
    def _no_unknown_variables(self):
        """A misspelled variable (``CERTSERVE_API_KEY`` for ``CERTSERVE_API_KEYS``) would otherwise be ignored and
        the server would start without the setting (here: without authentication): refused, naming the nearest."""
        known = {f"{ENV_PREFIX}{name.upper()}" for name in type(self).model_fields} | OTHER_VARIABLES
        unknown = sorted(k for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX) and k.upper() not in known
                         and not _service_link(k, v))
        if unknown:
            suffixes = {name.removeprefix(ENV_PREFIX): name for name in known}
            hints = [f"{k} (did you mean {suffixes[near[0]]}?)" if (near := difflib.get_close_matches(
                k.upper().removeprefix(ENV_PREFIX), suffixes, 1, 0.75)) else k for k in unknown]
            raise ValueError(f"unknown environment variable {', '.join(hints)}: certserve reads only the variables "
                             "listed in README (Configuration); unset or rename it")
        return self

    @model_validator(mode="after")
    def _each_variable_once(self):
        """pydantic-settings reads the names case-insensitively: with ``CERTSERVE_API_KEYS=secret`` and
        ``certserve_api_keys=`` both set, the later in the environment won, and the server could start without the
        value configured (here: without authentication). Refused, naming both (never a value)."""
        names: dict[str, list[str]] = {}
        for name in os.environ:
            if name.upper().startswith(ENV_PREFIX):
                names.setdefault(name.upper(), []).append(name)
        twice = sorted(" and ".join(sorted(group)) for group in names.values() if len(group) > 1)
        if twice:
            raise ValueError(f"one variable set twice under names that differ only in case: {'; '.join(twice)} "
                             "(certserve would read whichever comes last in the environment); unset one")
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _usable_keys(cls, keys):
        """A list (a Ray Serve config's ``args``, Python) is taken as it is: an empty key would let in every request
        that sends none, a space or a non-ASCII character would make a key that no header matches."""
        for i, key in enumerate(keys):
            if not key or not all(0x21 <= ord(c) <= 0x7E and c != "," for c in key):
                raise ValueError(f"API key {i + 1} of {len(keys)} is empty or holds a space, a comma or a character "
                                 "that is not printable ASCII: each key must be 1 or more of ASCII 0x21-0x7E, no ','")
        return keys


def _service_link(name: str, value: str) -> bool:
    """Whether ``name=value`` is a variable Kubernetes sets for a Service (its name and the form of its value)."""
    return any(pattern.fullmatch(name) and _LINK_VALUES[kind](value) for pattern, kind in _SERVICE_LINKS)


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_url(value: str) -> bool:
    url = re.fullmatch(r"(?:tcp|udp|sctp)://\[?([0-9A-Fa-f.:]+?)\]?:\d+", value)
    return url is not None and _is_address(url[1])


_LINK_VALUES = {"address": _is_address, "number": lambda v: v.isascii() and v.isdigit(),
                "protocol": lambda v: v in ("tcp", "udp", "sctp"),
                "url": _is_url}


@lru_cache
def get_settings() -> Settings:
    return Settings()
