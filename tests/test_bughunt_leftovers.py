"""Items noticed and left by earlier reviews, fixed in stop 37: each test names the bug it guards and failed on the
code before its fix (run once against it)."""

from __future__ import annotations

import httpx
import pytest

from certification.verify import MAX_JWKS_BYTES, VerificationError
from models.bundle import SCHEMA_VERSION, BundleError, load_bundle
from server.client import CertserveClient, CertserveError
from tests import bundle_helpers
from tests.bundle_helpers import _read_manifest, _write_manifest

bundle_copy = bundle_helpers.bundle_copy  # the fixture


def _client_answering(jwks_answer) -> CertserveClient:
    client = CertserveClient("http://certserve.test", verify=True)
    client._http.close()
    client._http = httpx.Client(base_url="http://certserve.test", transport=httpx.MockTransport(jwks_answer))
    return client


def test_the_clients_key_set_fetch_has_the_verifiers_size_cap():
    """``CertserveClient(verify=True)`` read the server's key set with its own GET (``_server_keyset``), without
    ``certserve verify``'s 1 MiB cap: a 2 MiB answer was read whole and parsed. Now it is read through
    :func:`certification.verify.load_jwks` and refused (``bad_jwks``) past the cap. Failed on the old client (it
    raised bad_jwks only after parsing, with "must be a JSON object", not the size)."""
    huge = b'{"keys": [], "pad": "' + b"x" * (2 * MAX_JWKS_BYTES) + b'"}'
    with _client_answering(lambda r: httpx.Response(200, content=huge)) as client, \
            pytest.raises(VerificationError) as info:
        client._server_keyset()
    assert info.value.reason == "bad_jwks" and f"larger than {MAX_JWKS_BYTES} bytes" in str(info.value)
    assert "http://certserve.test/.well-known/jwks.json" in str(info.value)


def test_the_clients_key_set_fetch_names_a_key_the_set_cannot_hold():
    """The same path names the key set's URL for an entry that is no Ed25519 key (``certserve verify`` and the
    client say the same thing). Guards the wrapping kept from the old client when its fetch moved to load_jwks."""
    bad = {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "!"}]}
    with _client_answering(lambda r: httpx.Response(200, json=bad)) as client, \
            pytest.raises(VerificationError) as info:
        client._server_keyset()
    assert info.value.reason == "bad_jwks"
    assert str(info.value).startswith("key set http://certserve.test/.well-known/jwks.json: ")


def test_certserve_error_carries_the_servers_error_code():
    """``CertserveError`` said ``HTTP 422: <message>``: a caller had to dig the code (``bad_image``,
    ``invalid_parameter``, ``overloaded``) out of ``body``. It is now ``code`` and part of the message; another
    server's body has no code. Failed on the old client (no attribute ``code``)."""
    envelope = {"error": {"code": "bad_image", "message": "not an image", "request_id": "r1"}}
    error = CertserveError(422, envelope)
    assert error.code == "bad_image" and str(error) == "HTTP 422 (bad_image): not an image"
    for body in ({"error": "invalid_token"}, "<html>Sign in</html>", ["a"], {"error": {"code": 7, "message": "m"}}):
        assert CertserveError(401, body).code is None and not str(CertserveError(401, body)).startswith("HTTP 401 (")


@pytest.mark.parametrize("version", [True, 1.0, 2.0])
@pytest.mark.parametrize("calibration_kept", [False, True])
def test_a_schema_version_that_is_no_json_integer_is_refused(bundle_copy, version, calibration_kept):
    """``"schema_version": true`` (or 1.0) compared equal to 1 in Python: a manifest without calibration was taken for
    a version-1 bundle and upgraded, so it loaded (and with its calibration it got version 1's "recalibrate" advice).
    A version is JSON's integer only: now each is "not supported". Failed on the old loader in all six cases (2.0
    was refused, but by the schema validator, with a message that did not name the version)."""
    manifest = _read_manifest(bundle_copy)
    manifest["schema_version"] = version
    if not calibration_kept:
        manifest.update(calibration=None, meta_features=None)
        manifest["artifacts"] = {"base": manifest["artifacts"]["base"]}
    _write_manifest(bundle_copy, manifest)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    assert f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION})" in str(info.value)


@pytest.mark.parametrize("flag, value", [("--alpha", "1"), ("--alpha", "0"), ("--alpha", "1e-16"), ("--alpha", "nan"),
                                         ("--alpha", "x")])
def test_evaluate_alpha_is_checked_when_parsed(flag, value, capsys):
    """``calibrate evaluate --alpha 1`` (or 0, 1e-16, nan) parsed and ran the whole evaluation (minutes of sampling)
    to a late error; now it is refused at once, by a request's rule (certification.plan: [1e-15, 1)). Failed on the
    old parser (type=float) in every case ("x": refused, but without the range expected)."""
    from cli.main import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["calibrate", "evaluate", flag, value])
    assert info.value.code == 2 and "[1e-15, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-0.25"])
def test_counts_sigma_must_be_positive(value, capsys):
    """``calibrate counts --sigma 0`` counted clean predictions as Monte-Carlo counts (and -0.25 the same noise
    under another name, recorded in meta.json as a sigma no bundle can have). Failed on the old parser
    (finite_float took both)."""
    from cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "counts", "--model", "m.onnx", "--n", "4", "--sigma", value,
                                   "--out", "o"])
    assert "must be a finite number > 0" in capsys.readouterr().err


def _cuda_runs() -> bool:
    import onnxruntime
    import torch

    return torch.cuda.is_available() or "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(_cuda_runs(), reason="the refusal of --device cuda needs a machine where CUDA cannot run")
def test_evaluate_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    """``calibrate evaluate --device cuda`` where no GPU can run died with load_backend's RuntimeError traceback
    (after the clean passes); now ``certserve: error: --device cuda: ...``, exit 2, as ``calibrate counts``. Failed on
    the old code (RuntimeError raised out of main)."""
    from cli.main import main

    code = main(["calibrate", "evaluate", "--images", "2", "--n", "4", "--n0", "2", "--device", "cuda",
                 "--out", str(tmp_path / "r.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("certserve: error: --device cuda: "), err


def test_an_export_whose_output_shape_differs_says_so(tmp_path, monkeypatch):
    """``export_onnx``'s check computed ``np.abs(got - want)`` for its message also when the shapes differ: numpy's
    "operands could not be broadcast" replaced the message meant for the user. The export is real; onnxruntime's
    answer is replaced by one with an extra class (the fault a mismatched graph gives). Failed on the old code
    (ValueError from numpy)."""
    import numpy as np
    import torch

    import models.export as export

    class OneClassMore(export.OnnxBackend):
        def forward(self, x):
            out = super().forward(x)
            return np.concatenate([out, out[:, :1]], axis=1)

    monkeypatch.setattr(export, "OnnxBackend", OneClassMore)
    with pytest.raises(RuntimeError, match=r"output shape \(1, 3\) at batch 1, torch gives \(1, 2\)"):
        export.export_onnx(torch.nn.Linear(4, 2), torch.zeros(1, 4), tmp_path / "m.onnx")
