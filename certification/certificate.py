"""The certificate and the model card (pydantic; also the HTTP contract) and the one certificate builder."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from certification.plan import FallbackReason, Route

GuaranteeKind = Literal["conformal-marginal", "anytime-valid", "clopper-pearson"]
#: Why sampling ended: certified (surrogate certified, or the best-radius rule stopped), target (target or proposed
#: radius verified), futility, budget (sequential or cohen: its budget spent), planned (fixed: drew the n planned
#: from its clean image), deadline, abstained (surrogate), shutdown
StoppedBy = Literal["certified", "target", "futility", "budget", "planned", "deadline", "abstained", "shutdown"]

GUARANTEE_OF_ROUTE: dict[str, GuaranteeKind] = {"surrogate": "conformal-marginal", "sequential": "anytime-valid",
                                                "fixed": "clopper-pearson", "cohen": "clopper-pearson"}
STATEMENTS = {
    "conformal-marginal": "marginal, not per input: over inputs exchangeable with the calibration inputs whose "
                          "surrogate confidence falls in the same bin, and over the draw of the calibration split, "
                          "P(radius exceeds the smoothed classifier's true radius for this class) <= alpha, within "
                          "each bin and hence over all inputs; alpha is the calibrated level used (the largest <= "
                          "the request's); not conditional on the surrogate having certified, nor on auto having "
                          "routed this input to it",
    "anytime-valid": "for this input, P(radius exceeds the smoothed classifier's true radius for the tested class) <= "
                     "alpha, at whatever time sampling stopped (class and Beta prior fixed from the clean image "
                     "before any noise sample)",
    "clopper-pearson": "for this input, P(certificate wrong) <= alpha (one-sided Clopper-Pearson bound on a number "
                       "of samples fixed before sampling, or cut short by a deadline or shutdown, which depend on the "
                       "clock only, never on the outcomes; for a class fixed before them: from separate selection "
                       "samples (cohen, Cohen et al. 2019) or from the clean image (fixed))",
}


class Guarantee(BaseModel):
    kind: GuaranteeKind
    alpha: float = Field(description="probability that the certificate is wrong (marginal or per input, see kind)")
    statement: str


class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str = Field(description="sha256 of the base model file (base.onnx)")
    manifest_sha256: str = Field(description="sha256 of the bundle's manifest.json (sigma, calibration quantiles, "
                                             "risk levels): compare with the hash published with the bundle")


class Timings(BaseModel):
    decode_ms: float
    surrogate_ms: float | None = None
    prior_ms: float | None = None
    queue_ms: float | None = None
    sampling_ms: float | None = None
    total_ms: float


class InputInfo(BaseModel):
    sha256: str | None = Field(description="SHA-256 of the image as received: the uploaded file's bytes (multipart), "
                                           "the bytes a base64 string decodes to, or a nested array as compact JSON")
    encoding: Literal["file", "base64", "array"] | None = Field(description="what sha256 hashes (see sha256)")
    tensor_sha256: str = Field(description="SHA-256 of the tensor the model saw: float32 little-endian, C order, "
                                           "(C, H, W), after any resize/convert")
    tensor_shape: list[int]


class Certificate(BaseModel):
    request_id: str
    class_index: int = Field(description="predicted class; -1 when abstaining")
    class_name: str | None
    certified: bool
    radius: float = Field(description="certified L2 radius in [0,1]-pixel units; 0 = abstain")
    method: Route
    guarantee: Guarantee
    samples: int = Field(description="base-model evaluations under noise spent on this request")
    p_lower: float | None = Field(description="lower bound on P(f(x+e) = class), where defined")
    fallback_reason: FallbackReason | None = None
    stopped_by: StoppedBy
    preprocessing: list[str] = Field(default_factory=list, description="what was done to the image, if asked")
    timings: Timings
    model: ModelInfo
    input: InputInfo | None = Field(None, description="hashes of the input as received and as seen by the model")
    signature: str | None = Field(None, description="compact JWS (EdDSA/Ed25519) over the certificate's claims, its "
                                                    "input hashes, the model and the key id; null when the server "
                                                    "has no signing key (see /.well-known/jwks.json)")


class ModelCard(BaseModel):
    name: str
    version: str
    sha256: str = Field(description="sha256 of the base model file (base.onnx)")
    manifest_sha256: str = Field(description="sha256 of the bundle's manifest.json, as every certificate states it")
    sigma: float
    input_shape: tuple[int, int, int]
    classes: list[str]
    has_surrogate: bool
    has_meta_prior: bool
    alpha_cal: float | None = Field(description="the surrogate's lowest calibrated risk level (None: no surrogate)")
    calibrated_levels: list[float] = Field(default_factory=list, description="the surrogate's risk ladder: a request's "
                                           "alpha uses the largest level <= alpha")
    default_alpha: float
    max_samples: int


def build_certificate(*, route: Route, class_index: int, radius: float, p_lower: float | None, samples: int,
                      stopped_by: StoppedBy, guarantee_alpha: float, classes: list[str], timings: Timings,
                      model: ModelInfo, request_id: str, preprocessing: list[str],
                      fallback_reason: FallbackReason | None = None) -> Certificate:
    """The certificate of one image; ``class_index`` -1 (abstain) makes it uncertified with radius 0.

    ``guarantee_alpha`` is the level the route's guarantee holds at: the request's alpha (per input) for the engine
    routes, the calibrated level the request's alpha selected (marginal) for the surrogate."""
    certified = class_index >= 0
    kind = GUARANTEE_OF_ROUTE[route]
    return Certificate(
        class_index=class_index, class_name=classes[class_index] if certified else None, certified=certified,
        radius=radius if certified else 0.0, method=route,
        guarantee=Guarantee(kind=kind, alpha=guarantee_alpha, statement=STATEMENTS[kind]),
        samples=samples, p_lower=p_lower, fallback_reason=fallback_reason, stopped_by=stopped_by,
        preprocessing=preprocessing, timings=timings, model=model, request_id=request_id)
