"""The HTTP request bodies and their OpenAPI description (responses are the service's pydantic models).

The multipart form and the JSON body carry the same parameters (:class:`certification.plan.CertifyParams`); the
OpenAPI document describes both exactly: typed fields with their enums and ranges, and the JSON request schemas in
``components/schemas``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from certification.certificate import Certificate, ModelCard
from certification.plan import CertifyParams

__all__ = ["BatchResponse", "Certificate", "CertifyParams", "ErrorResponse", "HealthResponse", "JSONBatchRequest",
           "JSONCertifyRequest", "JWKS", "ModelCard", "ReadyResponse", "request_body_doc"]


class JSONCertifyRequest(CertifyParams):
    image: str | list = Field(description="base64 PNG/JPEG/.npy, or a nested array (C,H,W or H,W) of floats in [0, 1]")


class JSONBatchRequest(CertifyParams):
    images: list[str | list] = Field(min_length=1, description="several images (each as `image` of "
                                     "JSONCertifyRequest); same parameters for all. At most the server's "
                                     "CERTSERVE_MAX_BATCH_IMAGES (default 64): beyond, 422 too_many_images")


class BatchResponse(BaseModel):
    results: list[Certificate]


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class HealthResponse(BaseModel):
    """GET /healthz: the process answers (503 engine_down instead once the engine thread has died)."""
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    """GET /readyz when ready (otherwise 503 with the error envelope)."""
    status: Literal["ready"]


class JWK(BaseModel):
    """One Ed25519 public key (RFC 8037), as certification.signing publishes it."""
    model_config = ConfigDict(extra="allow")
    kty: Literal["OKP"]
    crv: Literal["Ed25519"]
    x: str = Field(description="the public key, base64url")
    kid: str = Field(description="RFC 7638 thumbprint; a signed certificate's header names it")
    alg: str
    use: Literal["sig"]


class JWKS(BaseModel):
    """GET /.well-known/jwks.json (RFC 7517): every configured key, the active one first; empty when unsigned."""
    keys: list[JWK]


_REF = "#/components/schemas/{model}"


def request_schemas() -> dict:
    """JSON schemas of the request bodies, to be merged into ``components/schemas``."""
    _, top = models_json_schema([(JSONCertifyRequest, "validation"), (JSONBatchRequest, "validation")],
                                ref_template=_REF)
    return top.get("$defs", {})


def _form_fields() -> dict:
    """The parameters as multipart fields: the same types, enums and ranges as in JSON (a form cannot send null, so
    an optional field is described by its non-null type and is simply left out when unused)."""
    fields = {}
    for name, prop in CertifyParams.model_json_schema(ref_template=_REF)["properties"].items():
        prop = dict(prop)
        options = [o for o in prop.pop("anyOf", []) if o.get("type") != "null"]
        if options:
            prop.update(options[0])
        if prop.get("default", 0) is None:
            del prop["default"]
        fields[name] = prop
    return fields


def request_body_doc(*, batch: bool) -> dict:
    """``openapi_extra`` of POST /certify (one image) or /certify/batch (``images``, repeated). A urlencoded form is
    parsed like a multipart one (server.requests), its image fields being base64 text."""
    binary = {"type": "string", "format": "binary", "description": "PNG, JPEG or .npy"}
    text = {"type": "string", "description": "base64 of PNG, JPEG or .npy bytes"}
    limit = ("; at most the server's CERTSERVE_MAX_BATCH_IMAGES (default 64), beyond: 422 too_many_images"
             if batch else "")

    def form(item: dict) -> dict:
        schema = {"type": "array", "items": item, "minItems": 1,
                  "description": "the field repeated, once per image" + limit} if batch else item
        field = "images" if batch else "image"
        return {"schema": {"type": "object", "required": [field], "additionalProperties": False,
                           "properties": {field: schema, **_form_fields()}}}

    model = "JSONBatchRequest" if batch else "JSONCertifyRequest"
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": form(binary),
        "application/x-www-form-urlencoded": form(text),
        "application/json": {"schema": {"$ref": _REF.format(model=model)}}}}}
