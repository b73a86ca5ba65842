"""The model bundle: a directory with ``manifest.json`` and ONNX artifacts, verified before anything is served.

Loading checks the schema version, every artifact's presence and sha256, and every model's input/output shape
against the manifest, and refuses with :class:`BundleError` (a message that says what is wrong and what was
expected). A bundle with only ``base.onnx`` is valid: it serves the sequential and Cohen paths.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from models.bundle_dir import ARTIFACT_FILES, STAGING_PREFIX, build_lock, read_lock
from models.priors import FEATURE_NAMES
from models.strict_json import RepeatedKey, unique_keys
from smoothing import min_calibration_size

SCHEMA_VERSION = 2
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "bundles" / "fmnist-sigma0.25"


class BundleError(ValueError):
    """The bundle is missing, malformed, or inconsistent with its manifest (a model file whose sha256 is not the
    manifest's: tampered or corrupt). The manifest itself is trusted input, as the code is: a hand edit that keeps
    it consistent (e.g. other quantiles) loads. What guards it is its own sha256, which every certificate
    (``model.manifest_sha256``, signed when certificates are signed) and ``GET /v1/models`` state, to compare with
    the hash published with the bundle."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    shape: tuple[int, int, int] = Field(description="(channels, height, width)")
    value_range: tuple[float, float] = (0.0, 1.0)
    dtype: Literal["float32"] = "float32"

    @field_validator("shape")
    @classmethod
    def _positive(cls, v):
        if any(d < 1 for d in v):
            raise ValueError("every input dimension must be >= 1")
        return v

    @field_validator("value_range")
    @classmethod
    def _unit_range(cls, v):
        if tuple(v) != (0.0, 1.0):  # the server checks and feeds [0, 1] pixels whatever the manifest says
            raise ValueError(f"value_range must be [0, 1], got {list(v)}: the server feeds the model pixels in [0, 1] "
                             "(a model that expects another range normalizes inside its graph)")
        return v


class Artifact(_Strict):
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ConformalLevel(_Strict):
    """One risk level of the surrogate's calibration (smoothing.conformal): alpha = delta + alpha_1, the point-estimate
    map (knots -> values), the scale map (knots -> scale), the Mondrian bin edges on the log-odds and one quantile
    per bin (null: the bin has too few calibration scores at this level and abstains)."""

    alpha: float = Field(gt=0, lt=1)
    delta: float = Field(gt=0, lt=1)
    alpha_1: float = Field(gt=0, lt=1)
    knots: list[float] = Field(min_length=1)
    values: list[float] = Field(min_length=1)
    scale: list[float] = Field(min_length=1)
    edges: list[float]
    q_hat: list[float | None] = Field(min_length=1)
    bin_sizes: list[Annotated[int, Field(ge=0)]]  # counts (a negative one let another bin claim more scores)

    @model_validator(mode="after")
    def _consistent(self):
        if not math.isclose(self.alpha, self.delta + self.alpha_1, rel_tol=1e-9):
            raise ValueError(f"level alpha ({self.alpha}) must equal delta + alpha_1 ({self.delta + self.alpha_1})")
        if Fraction(self.delta) + Fraction(self.alpha_1) > Fraction(self.alpha):  # the certificate reports alpha
            raise ValueError(f"level alpha ({self.alpha!r}) is below delta + alpha_1 ({self.delta!r} + "
                             f"{self.alpha_1!r}) in exact arithmetic: the guarantee would overstate its level "
                             "(smoothing.conformal.level_split rounds delta down)")
        if not (len(self.knots) == len(self.values) == len(self.scale)):
            raise ValueError("knots, values and scale must have the same length")
        finite = all(map(math.isfinite, [*self.knots, *self.values, *self.scale, *self.edges]))
        if not finite or any(b <= a for a, b in zip(self.knots, self.knots[1:])):
            raise ValueError("knots must be finite and strictly increasing; values, scale and edges finite")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:])) or min(self.scale) <= 0:
            raise ValueError("bin edges must be strictly increasing and every scale > 0")
        if not (len(self.q_hat) == len(self.bin_sizes) == len(self.edges) + 1):
            raise ValueError("q_hat and bin_sizes need one entry per bin (len(edges) + 1)")
        if any(q is not None and not math.isfinite(q) for q in self.q_hat):
            raise ValueError("a bin's q_hat must be a finite number or null (the bin abstains)")
        need = min_calibration_size(self.delta)
        if any(q is not None and size < need for q, size in zip(self.q_hat, self.bin_sizes)):
            raise ValueError(f"a bin with fewer than {need} calibration scores (the minimum at delta = {self.delta}) "
                             "has no finite quantile: its q_hat must be null")
        return self

    def as_arguments(self) -> dict:
        """Keyword arguments of smoothing.conformal_certificate (null quantiles become +inf: the bin abstains)."""
        return {"knots": self.knots, "values": self.values, "scale": self.scale, "edges": self.edges,
                "q_hat": [math.inf if q is None else q for q in self.q_hat]}

    @functools.cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        """:meth:`as_arguments` as float64 arrays, built once: the arguments of
        smoothing.conformal.validated_conformal_certificate (checked by the validator above when the bundle loads)."""
        return {name: np.asarray(v, dtype=np.float64) for name, v in self.as_arguments().items()}


class Calibration(_Strict):
    """Conformal calibration of the surrogate in probit units with Mondrian bins, at a ladder of risk levels."""

    method: Literal["probit-mondrian"] = "probit-mondrian"
    guarantee: Literal["marginal", "training-conditional"] = "marginal"
    gamma: float | None = Field(None, gt=0, lt=1, description="training-conditional: P(realised miss rate > level), "
                                "per bin (each bin's quantile has its own PAC rank)")
    samples_per_image: int = Field(ge=1)
    num_calibration: int = Field(ge=1)
    num_tuning: int = Field(ge=1)
    levels: list[ConformalLevel] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _not_the_old_block(cls, data):
        if isinstance(data, dict) and "q_hat" in data:
            raise ValueError("this is the calibration block of certserve < 0.3 (one q_hat in probability units); "
                             "recalibrate the bundle with `certserve calibrate conformal`")
        return data

    @model_validator(mode="after")
    def _consistent(self):
        alphas = [lv.alpha for lv in self.levels]
        if alphas != sorted(set(alphas), reverse=True):
            raise ValueError(f"levels must have distinct alphas, largest first; got {alphas}")
        if (self.guarantee == "training-conditional") != (self.gamma is not None):
            raise ValueError("gamma is required with (and only with) the training-conditional guarantee")
        wrong = [lv.alpha for lv in self.levels if sum(lv.bin_sizes) != self.num_calibration]
        if wrong:  # every level bins all the calibration scores
            raise ValueError(f"the bins of level(s) {wrong} do not hold the num_calibration = {self.num_calibration} "
                             "calibration scores")
        return self

    @property
    def alpha_cal(self) -> float:
        """The smallest calibrated level: requests with a smaller alpha cannot use the surrogate."""
        return self.levels[-1].alpha

    def level_for(self, alpha: float) -> ConformalLevel | None:
        """The largest calibrated level <= ``alpha`` (None below the smallest level)."""
        return next((lv for lv in self.levels if lv.alpha <= alpha), None)


class Manifest(_Strict):
    schema_version: int
    name: str = Field(min_length=1)
    version: str = "1"
    sigma: float = Field(gt=0, allow_inf_nan=False, strict=True)  # no inf (failed the engine), no true read as 1.0
    input: InputSpec
    classes: list[str] = Field(min_length=2)
    artifacts: dict[Literal["base", "surrogate", "meta"], Artifact]
    calibration: Calibration | None = None
    meta_features: list[str] | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo):
        if "base" not in self.artifacts:
            raise ValueError("artifacts must include 'base' (the base classifier)")
        recalibrating = bool(info.context and info.context.get("recalibrating"))
        if "surrogate" in self.artifacts and self.calibration is None and not recalibrating:
            raise ValueError("a surrogate needs its conformal 'calibration' block")
        if self.calibration is not None and "surrogate" not in self.artifacts:  # /v1/models stated its alpha_cal
            raise ValueError("a 'calibration' block needs the 'surrogate' artifact it calibrates (or remove the block)")
        if "meta" in self.artifacts and not self.meta_features:
            raise ValueError("a meta model needs 'meta_features' (its input order)")
        names = [c.strip() for c in self.classes]
        if not all(names) or len(set(names)) != len(names):  # a certificate names its class: one name, one class
            raise ValueError(f"classes must be distinct, non-blank names, got {self.classes}")
        if self.meta_features and list(self.meta_features) != list(FEATURE_NAMES):  # the order the service feeds
            raise ValueError(f"meta_features must be {list(FEATURE_NAMES)} (the features the server computes, in "
                             f"that order), got {self.meta_features}")
        return self


class Bundle:
    """A verified bundle: manifest plus artifact paths. Create with :func:`load_bundle`."""

    def __init__(self, root: Path, manifest: Manifest, manifest_sha256: str, models: dict[str, bytes]):
        self.root = root
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256  # of the manifest.json bytes this bundle was loaded from
        self._models = models  # role -> the model bytes whose sha256 was checked: sessions load these, never the
        # file again (a file replaced after loading cannot be served), and a model whose weights live in other files
        # (ONNX external data, not covered by the manifest) cannot be loaded from bytes: refused at load

    def path(self, role: str) -> Path | None:
        art = self.manifest.artifacts.get(role)
        return None if art is None else self.root / art.file

    def model_bytes(self, role: str) -> bytes:
        return self._models[role]  # the bytes whose sha256 was checked at load

    @property
    def model_sha256(self) -> str:
        return self.manifest.artifacts["base"].sha256

    def backend(self, role: str = "base", **kwargs):
        from models.backends import OnnxBackend, onnx_backend

        if role not in self._models:
            raise BundleError(f"bundle {self.manifest.name!r} has no {role} model")
        model = self._models[role]
        if role == "base":
            kwargs.setdefault("noise_sigma", self.manifest.sigma)
        if kwargs.get("device", "auto") == "cpu" or "noise_in_graph" in kwargs:
            return OnnxBackend(model, **kwargs)
        return onnx_backend(model, **kwargs)  # auto / cuda: onnxruntime-gpu, else PyTorch on the GPU


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_bundle(root: str | Path = DEFAULT_BUNDLE_DIR, *, check_models: bool = True,
                for_recalibration: bool = False) -> Bundle:
    """Load and verify a bundle directory; raise BundleError saying exactly what is wrong.

    ``for_recalibration``: the surrogate's calibration block is dropped unread (any version), so that a bundle whose
    calibration is old or missing can be recalibrated (``certserve calibrate conformal``); never for serving."""
    with read_lock(Path(root)):  # a build of root (create_bundle) swaps no file while this reads
        return _load_bundle(Path(root), check_models, for_recalibration)


def _load_bundle(root: Path, check_models: bool, for_recalibration: bool) -> Bundle:
    manifest_path = root / "manifest.json"
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} does not exist")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path} is missing: a bundle is a directory with manifest.json and base.onnx")
    manifest_bytes = manifest_path.read_bytes()
    try:
        raw = json.loads(manifest_bytes, object_pairs_hook=unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from None
    except RepeatedKey as exc:
        raise BundleError(f"{manifest_path}: key {exc.args[0]!r} appears twice in one object (JSON readers disagree "
                          "on which value counts, and the manifest's sha256 covers both)") from None
    found = raw.get("schema_version") if isinstance(raw, dict) else None
    version = found if type(found) is int else None  # JSON's integer only: true and 1.0 are no version
    if for_recalibration and version in (1, SCHEMA_VERSION):
        raw = {**raw, "calibration": None}
    if version == 1 and raw.get("calibration") is None:
        raw, version = {**raw, "schema_version": SCHEMA_VERSION}, SCHEMA_VERSION  # v2 changed only the calibration
    if version == 1:
        raise BundleError(f"{manifest_path}: schema_version 1 holds the old surrogate calibration (one q_hat in "
                          f"probability units): recalibrate, `certserve calibrate conformal` (expected {SCHEMA_VERSION})")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{manifest_path}: schema_version {found!r} is not supported (expected {SCHEMA_VERSION})")
    try:  # JSON's own types, as a request's: "0.1" is no alpha, true no bin size (lax mode read them as numbers)
        manifest = Manifest.model_validate_json(json.dumps(raw), strict=True,
                                                context={"recalibrating": for_recalibration})
    except ValidationError as exc:
        raise BundleError(f"{manifest_path} does not match the bundle schema: {exc}") from None
    models = {}
    for role, art in manifest.artifacts.items():
        path = root / art.file
        if Path(art.file).name != art.file:
            raise BundleError(f"artifact {role}: file name {art.file!r} must be a plain name inside the bundle")
        if not path.is_file():
            raise BundleError(f"artifact {role}: {path} is missing")
        models[role] = path.read_bytes()  # hashed once, and these very bytes are what the sessions load
        actual = hashlib.sha256(models[role]).hexdigest()
        if actual != art.sha256:
            raise BundleError(f"artifact {role}: sha256 of {path.name} is {actual}, manifest says {art.sha256} (tampered or corrupt)")
    bundle = Bundle(root, manifest, hashlib.sha256(manifest_bytes).hexdigest(), models)
    if check_models:
        _check_shapes(bundle)
    return bundle


def _check_shapes(bundle: Bundle) -> None:
    m = bundle.manifest
    k = len(m.classes)
    expected = {"base": (list(m.input.shape), k), "surrogate": (list(m.input.shape), k)}
    if m.meta_features:
        expected["meta"] = ([len(m.meta_features)], 2)
    for role in m.artifacts:
        try:
            backend = bundle.backend(role, threads=1, device="cpu")
        except Exception as exc:  # onnxruntime raises its own types for unreadable models
            raise BundleError(f"artifact {role}: {bundle.path(role).name} is not a loadable ONNX model (weights in "
                              f"separate files, ONNX external data, are not supported: the manifest's sha256 must "
                              f"cover every byte served): {exc}") from None
        check_model(backend, f"artifact {role}", *expected[role])


def check_model(backend, what: str, want_in: list[int], want_out: int, *, expected_by: str = "manifest") -> None:
    """BundleError (prefixed ``what``) unless ``backend``'s model takes one float32 input of (batch, ``want_in``)
    with a dynamic batch axis and gives one (batch, ``want_out``) float output, as the server feeds and reads it.
    Also how ``certserve calibrate all --base`` checks a user's model before any work (``expected_by``: "data")."""
    inputs = backend.session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)":
        found = ", ".join(f"{i.name!r} {i.type}" for i in inputs)
        raise BundleError(f"{what}: the model's inputs are {found}; expected exactly one float32 input "
                          f"(tensor(float), batch x {want_in}): the server feeds it float32 values (pixels in "
                          "[0, 1] plus float32 Gaussian noise); a model in another precision casts in its graph")
    got_in = list(backend.input_shape[1:])
    if got_in != want_in:
        raise BundleError(f"{what}: model input shape (batch, {got_in}) does not match {expected_by} (batch, {want_in})")
    outputs = backend.session.get_outputs()
    if len(outputs) != 1:
        raise BundleError(f"{what}: the model has {len(outputs)} outputs ({[o.name for o in outputs]}); "
                          f"expected exactly one, the (batch, {want_out}) float logits")
    for n in (2, 1):  # probe passes: the engine batches many inputs (dynamic batch axis) and reads (batch, width)
        # rows; the request path runs one clean image at a time (a torch .squeeze() exports as (K,) at batch 1)
        try:
            out = np.asarray(backend.forward(np.zeros((n, *want_in), dtype=np.float32)))
        except Exception as exc:
            raise BundleError(f"{what}: a forward pass on a batch of {n} input(s) failed (the model "
                              f"needs a dynamic batch axis): {exc}") from None
        if out.ndim != 2 or out.shape[0] != n:
            raise BundleError(f"{what}: a batch of {n} input(s) gives outputs of shape {out.shape}; "
                              f"expected ({n}, {want_out}): one row of {want_out} per input")
        if out.shape[1] != want_out:
            raise BundleError(f"{what}: model has {out.shape[1]} outputs, {expected_by} expects {want_out}")
        if not np.issubdtype(out.dtype, np.floating):
            raise BundleError(f"{what}: model outputs {out.dtype} values; expected float logits")


def create_bundle(out: str | Path, *, base: str | Path, sigma: float, input_shape: tuple[int, int, int],
                  classes: list[str], name: str | None = None, version: str = "1", surrogate: str | Path | None = None,
                  meta: str | Path | None = None, calibration: dict | None = None, meta_features: list[str] | None = None,
                  provenance: dict | None = None, overwrite: bool = False) -> Bundle:
    """Write a bundle directory (copies the ONNX files, hashes them, writes the manifest) and verify it by loading.

    The new bundle is built and verified in a fresh staging directory inside ``out`` first: a refused one (a bad
    sigma, a model that does not match the classes or shape) leaves ``out`` as it was, an existing bundle there
    (``overwrite``) intact, and a new ``out`` not created; only a verified one replaces its files (renames), holding
    ``out``'s lock (models.bundle_dir: another build of ``out`` waits, a load waits for the swap)."""
    out, created = Path(out), not os.path.lexists(out)
    if not created and not out.is_dir():
        raise BundleError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=not created)  # FileExistsError: another build created it meanwhile
    with build_lock(out):  # and clears what killed builds left
        if any(out.iterdir()) and not overwrite:
            raise BundleError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
        _stage_and_swap(out, created, base=base, sigma=sigma, input_shape=input_shape, classes=classes, name=name,
                        version=version, surrogate=surrogate, meta=meta, calibration=calibration,
                        meta_features=meta_features, provenance=provenance)
        return _load_bundle(out, True, False)  # still locked: this build's bundle, not a next build's


def _stage_and_swap(out: Path, created: bool, *, base, sigma, input_shape, classes, name, version, surrogate, meta,
                    calibration, meta_features, provenance) -> None:
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))  # unique (a pid is not, across containers)
    try:
        artifacts = {}
        for role, src in (("base", base), ("surrogate", surrogate), ("meta", meta)):
            if src is None:
                continue
            src = Path(src)
            if not src.is_file():
                raise BundleError(f"{role} model {src} does not exist")
            shutil.copyfile(src, staging / ARTIFACT_FILES[role])
            artifacts[role] = {"file": ARTIFACT_FILES[role], "sha256": sha256_file(staging / ARTIFACT_FILES[role])}
        manifest = Manifest.model_validate({
            "schema_version": SCHEMA_VERSION, "name": name or out.name, "version": version, "sigma": sigma,
            "input": {"shape": list(input_shape)}, "classes": list(classes), "artifacts": artifacts,
            "calibration": calibration, "meta_features": meta_features, "provenance": provenance or {},
        })
        (staging / "manifest.json").write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
        load_bundle(staging)  # verified before anything in out changes
    except BaseException:
        shutil.rmtree(out if created else staging, ignore_errors=True)
        raise
    (out / "manifest.json").unlink(missing_ok=True)  # no old manifest ever describes new artifacts
    for role, file in ARTIFACT_FILES.items():  # a stale artifact of an overwritten bundle must not linger
        if role in artifacts:
            os.replace(staging / file, out / file)
        elif (out / file).exists():
            (out / file).unlink()
    os.replace(staging / "manifest.json", out / "manifest.json")
    shutil.rmtree(staging, ignore_errors=True)
