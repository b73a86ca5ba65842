"""What the certification service needs to know from the settings (the HTTP layer's ``Settings`` builds it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.defaults import AUTO_MAX_SAMPLES, AUTO_MIN_SURROGATE_Z, COHEN_N0, DEFAULT_ALPHA, MAX_SAMPLES


@dataclass(frozen=True)
class ServiceConfig:
    default_alpha: float = DEFAULT_ALPHA  # request alpha when the client sends none
    max_samples: int = MAX_SAMPLES  # cap and default of a request's sample budget
    auto_max_samples: int = AUTO_MAX_SAMPLES  # budget of an auto-mode fallback that sets no max_samples
    auto_min_surrogate_z: float = AUTO_MIN_SURROGATE_Z  # auto: surrogate only at radius >= this x sigma
    cohen_n0: int = COHEN_N0  # selection samples of cohen mode
    default_deadline_ms: int = 30_000  # deadline (from arrival) of a job whose request sets none
    device: Literal["auto", "cpu", "cuda"] = "auto"  # the engine's device
    threads: int = 0  # onnxruntime threads of the engine's sampler (0: all cores)
    batch_size: int = 0  # noise samples per model call (0: models.defaults.default_batch_size(device))
    max_live_jobs: int = 512  # engine jobs in flight; beyond, ServiceError("queue_full")
    sampler_idle: bool = True  # CPU sampler threads run under SCHED_IDLE: a waking request-path thread preempts them
    sampler_nice: int = 10  # without SCHED_IDLE: CPU sampler threads run at this lower priority
    signing_key: str | None = None  # Ed25519 PEM file, directory or list (certification.signing); None: unsigned
    audit_log: str | None = None  # JSON-lines audit log of every certificate (certification.audit); None: none
    audit_max_bytes: int = 100 * 2**20  # rotate the audit log beyond this size (0: never)
    audit_backups: int = 10  # rotated audit files kept
    audit_fsync: bool = False  # fsync each audit line before answering (survives power loss / a host crash)
