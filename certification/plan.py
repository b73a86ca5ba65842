"""The one conversion from a request to what the service will do: parameters + config + calibration -> :class:`Plan`.

Pure (no ONNX, no engine, no clock): :func:`make_plan` is tested on its own. Routing of ``auto``: the surrogate's
certificate when the bundle has a surrogate, the caller did not ask for a per-input guarantee, the request's alpha >=
alpha_cal (the bundle's lowest calibrated level; the certificate reports the largest level <= alpha it used), and the
calibrated radius is > 0 and >= ``target_radius`` (without a target: >= ``auto_min_surrogate_z`` x sigma, where the
per-input path certifies more for a few hundred samples, models.surrogate.auto_uses_surrogate); otherwise a
sequential job (``fallback_reason`` says why) that, without a caller's target radius, runs the per-input path: it
stops by the latency-oriented lambda (``Plan.per_input_lambda``) and, where the bundle has a surrogate, takes its
proposed radius (``Plan.proposal``: stop as soon as it is verified at the request's alpha, else by the best-radius
rule; not a target: no futility stop). ``sequential``, ``fixed`` and ``cohen`` always go to the engine;
``surrogate`` refuses what it cannot certify; ``fixed`` (a sample size planned from the clean image, one
Clopper-Pearson bound) takes no target radius.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from certification.config import ServiceConfig
from certification.errors import ServiceError

Mode = Literal["auto", "surrogate", "sequential", "fixed", "cohen"]
Route = Literal["surrogate", "sequential", "fixed", "cohen"]
FallbackReason = Literal["no_surrogate", "alpha_below_alpha_cal", "per_input_requested", "surrogate_abstained",
                         "below_target_radius", "below_auto_min_radius"]


class CertifyParams(BaseModel):
    """Parameters of a certification (form fields or JSON keys)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    alpha: float | None = Field(None, gt=0, lt=1, json_schema_extra={"minimum": 1e-15},
                                description="risk budget (at least 1e-15: below, floating point "
                                "cannot hold the bounds); default: the server's "
                                "(CERTSERVE_DEFAULT_ALPHA, see GET /v1/models). The "
                                "surrogate answers at the largest calibrated level <= alpha (the certificate's "
                                "guarantee.alpha says which); below the lowest level, auto falls back to sequential")
    mode: Mode = Field("auto", description="auto: the surrogate's one-pass certificate (marginal guarantee, at the "
                       "largest calibrated level <= alpha) where its radius is large enough, else sequential; "
                       "surrogate: the surrogate only; sequential: the anytime-valid e-process (per input at alpha); "
                       "fixed: Clopper-Pearson on a sample size planned from the clean image (per input); cohen: "
                       "Cohen et al.'s CERTIFY (per input). The certificate's guarantee field states which")
    target_radius: float | None = Field(None, ge=0, le=100,
                                        description="certify at least this L2 radius; stop as soon as it is. "
                                        "mode=auto or sequential only (surrogate, fixed and cohen refuse it: 422 "
                                        "bad_request)")
    max_samples: int | None = Field(None, ge=1, description="sample budget (capped by the server's max_samples); "
                                    "cohen: n, its estimation samples, with the n0 selection samples on top")
    deadline_ms: int | None = Field(None, ge=1, le=600_000, description="return the valid certificate reached by then")
    per_input: bool = Field(False, description="require a per-input guarantee (never the marginal surrogate). With "
                            "mode=auto the e-process job then targets the surrogate's proposed radius and stops once "
                            "it is verified at alpha; sequential, fixed and cohen are per input anyway")
    resize: bool = Field(False, description="resize to the model's input size instead of rejecting")
    convert: bool = Field(False, description="convert colour mode (RGB<->grey) instead of rejecting")

    @field_validator("alpha", "target_radius")
    @classmethod
    def _finite(cls, v):
        if v is not None and v != v:
            raise ValueError("must be a finite number")
        return v

    @field_validator("alpha")
    @classmethod
    def _representable(cls, v):
        if v is not None and 0 < v < 1e-15:
            raise ValueError("must be at least 1e-15 (below, floating point cannot hold the bounds)")
        return v


@dataclass(frozen=True)
class Plan:
    """What the service does with one image: the route, the alpha it tests at, the engine budget and deadline."""

    route: Route
    alpha: float  # the request's alpha (the surrogate's certificate reports the calibrated level instead)
    budget: int  # engine samples (sequential: at most; fixed: the cap of the planned n; cohen: n)
    deadline: float  # time.monotonic() seconds: arrival + deadline_ms
    target_radius: float | None
    fallback_reason: FallbackReason | None = None
    proposal: bool = False  # sequential: stop once the surrogate's proposed radius is verified, else best radius
    # sequential: stop by the per-input path's lambda, smoothing.PER_INPUT_MIN_GAIN (every auto fallback without a
    # target, with or without a surrogate to propose a radius: auto's latency-oriented rule)
    per_input_lambda: bool = False


def request_alpha(params: CertifyParams, config: ServiceConfig) -> float:
    """The alpha a request is certified at: its own, else the server's default."""
    return params.alpha if params.alpha is not None else config.default_alpha


def samples_every_image(params: CertifyParams, config: ServiceConfig, *, alpha_cal: float | None) -> bool:
    """Whether a request's images all go to the engine, whatever the surrogate says of each: the sampling modes, and
    ``auto`` where it cannot route to the surrogate at all (no surrogate: ``alpha_cal`` None; per_input; alpha below
    alpha_cal), by the same rule as :func:`make_plan`'s fallback reason."""
    if params.mode in ("sequential", "fixed", "cohen"):
        return True
    return params.mode == "auto" and (alpha_cal is None or params.per_input or request_alpha(params, config) < alpha_cal)


def make_plan(params: CertifyParams, config: ServiceConfig, *, alpha_cal: float | None,
              surrogate_radius: float | None, sigma: float, arrival: float) -> Plan:
    """Turn a request into a plan. ``alpha_cal``: the bundle's calibrated level (None without a surrogate);
    ``surrogate_radius``: the calibrated radius of this image (None when the surrogate did not run); ``sigma``: the
    bundle's noise level (auto's threshold is ``config.auto_min_surrogate_z`` sigmas);
    ``arrival``: time.monotonic() at arrival, which anchors the deadline. Raises ServiceError for mode=surrogate
    requests that the surrogate cannot answer."""
    alpha = request_alpha(params, config)
    mode = params.mode
    if mode == "surrogate":
        _check_surrogate_request(params, alpha, alpha_cal, surrogate_radius)
    if mode in ("fixed", "cohen", "surrogate") and params.target_radius is not None:
        raise ServiceError("bad_request", f"mode={mode} cannot stop at a target_radius (" + (
            "one forward pass" if mode == "surrogate" else "a sample size fixed in advance") + "); use "
            "mode=auto or sequential with target_radius")
    fallback = None
    if mode == "auto":
        fallback = _fallback_reason(params, alpha, alpha_cal, surrogate_radius,
                                    min_radius=config.auto_min_surrogate_z * sigma)
    default_budget = config.auto_max_samples if mode == "auto" else config.max_samples
    budget = min(params.max_samples or default_budget, config.max_samples)
    deadline = arrival + (params.deadline_ms or config.default_deadline_ms) / 1e3
    if mode == "surrogate" or mode == "auto" and fallback is None:
        route: Route = "surrogate"
    else:
        route = mode if mode in ("cohen", "fixed") else "sequential"
    per_input_path = mode == "auto" and route == "sequential" and params.target_radius is None
    proposal = per_input_path and fallback != "no_surrogate"
    return Plan(route, alpha, budget, deadline, params.target_radius, fallback, proposal, per_input_path)


def _check_surrogate_request(params: CertifyParams, alpha: float, alpha_cal: float | None,
                             surrogate_radius: float | None) -> None:
    if surrogate_radius is None or alpha_cal is None:
        raise ServiceError("no_surrogate", "this bundle has no surrogate; use mode=auto (which samples), "
                                           "sequential, fixed or cohen")
    if params.per_input:
        raise ServiceError("per_input_unavailable", "the surrogate's guarantee is marginal, not per input; use "
                                                    "mode=auto or sequential")
    if alpha < alpha_cal:
        raise ServiceError("alpha_below_alpha_cal", f"the surrogate is calibrated down to alpha_cal = {alpha_cal}; "
                                                    f"alpha = {alpha} needs mode=auto or sequential")


def _fallback_reason(params: CertifyParams, alpha: float, alpha_cal: float | None, surrogate_radius: float | None,
                     *, min_radius: float) -> FallbackReason | None:
    if surrogate_radius is None or alpha_cal is None:
        return "no_surrogate"
    if params.per_input:
        return "per_input_requested"
    if alpha < alpha_cal:
        return "alpha_below_alpha_cal"
    if surrogate_radius <= 0:
        return "surrogate_abstained"
    if params.target_radius is not None:
        return "below_target_radius" if surrogate_radius < params.target_radius else None
    return "below_auto_min_radius" if surrogate_radius < min_radius else None
