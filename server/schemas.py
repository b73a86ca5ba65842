"""The HTTP contract: request parameters and the certificate response (pydantic models, shown in OpenAPI)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Mode = Literal["auto", "surrogate", "sequential", "cohen"]
Method = Literal["surrogate", "sequential", "cohen"]
GuaranteeKind = Literal["conformal-marginal", "anytime-valid", "clopper-pearson"]
StoppedBy = Literal["certified", "target", "futility", "budget", "deadline", "abstained", "shutdown"]
FallbackReason = Literal["no_surrogate", "alpha_below_alpha_cal", "per_input_requested", "surrogate_abstained",
                         "below_target_radius"]


class CertifyParams(BaseModel):
    """Parameters of a certification (form fields or JSON keys)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    alpha: float | None = Field(None, gt=0, lt=1, description="risk budget; default: the server's (0.001)")
    mode: Mode = "auto"
    target_radius: float | None = Field(None, ge=0, le=100, description="certify at least this L2 radius; stop as soon as it is")
    max_samples: int | None = Field(None, ge=1, description="sample budget (capped by the server's max_samples)")
    deadline_ms: int | None = Field(None, ge=1, le=600_000, description="return the valid certificate reached by then")
    per_input: bool = Field(False, description="require a per-input guarantee (never the marginal surrogate)")
    resize: bool = Field(False, description="resize to the model's input size instead of rejecting")
    convert: bool = Field(False, description="convert colour mode (RGB<->grey) instead of rejecting")

    @field_validator("alpha", "target_radius")
    @classmethod
    def _finite(cls, v):
        if v is not None and v != v:
            raise ValueError("must be a finite number")
        return v


class JSONCertifyRequest(CertifyParams):
    image: str | list = Field(description="base64 PNG/JPEG/.npy, or a nested array (C,H,W or H,W) of floats in [0, 1]")


class JSONBatchRequest(CertifyParams):
    images: list[str | list] = Field(min_length=1, description="several images; same parameters for all")


class Guarantee(BaseModel):
    kind: GuaranteeKind
    alpha: float = Field(description="probability that the certificate is wrong (marginal or per input, see kind)")
    statement: str


class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str


class Timings(BaseModel):
    decode_ms: float
    surrogate_ms: float | None = None
    prior_ms: float | None = None
    queue_ms: float | None = None
    sampling_ms: float | None = None
    total_ms: float


class Certificate(BaseModel):
    request_id: str
    class_index: int = Field(description="predicted class; -1 when abstaining")
    class_name: str | None
    certified: bool
    radius: float = Field(description="certified L2 radius in [0,1]-pixel units; 0 = abstain")
    method: Method
    guarantee: Guarantee
    samples: int = Field(description="base-model evaluations under noise spent on this request")
    p_lower: float | None = Field(description="lower bound on P(f(x+e) = class), where defined")
    fallback_reason: FallbackReason | None = None
    stopped_by: StoppedBy
    preprocessing: list[str] = Field(default_factory=list, description="what was done to the image, if asked")
    timings: Timings
    model: ModelInfo


class BatchResponse(BaseModel):
    results: list[Certificate]


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    name: str
    version: str
    sha256: str
    sigma: float
    input_shape: tuple[int, int, int]
    classes: list[str]
    has_surrogate: bool
    has_meta_prior: bool
    alpha_cal: float | None
    default_alpha: float
    max_samples: int
