"""Bug hunt (verification): valid certificates rejected for how a number is written, and an image check skipped.

Real keys and real signatures (the helpers of ``tests/test_verify.py``: a fixed image, a seeded tensor); nothing of
the verifier is mocked.
"""

from __future__ import annotations

import json
import time

import pytest

from certification.signing import Signer, generate_key_files
from certification.verify import VerificationError, verify_document
from test_verify import IMAGE, NOW, run_cli, sign_certificate


@pytest.fixture
def signer(tmp_path) -> Signer:
    generate_key_files(tmp_path / "keys")
    return Signer.from_paths(tmp_path / "keys")


def _uncertified(signer: Signer, **kwargs) -> dict:
    doc, _ = sign_certificate(signer, class_index=-1, class_name=None, certified=False, radius=0.0, p_lower=1.0,
                              **kwargs)
    return doc


def test_a_float_written_as_an_integer_still_verifies(signer, tmp_path, capsys):
    """Every uncertified certificate has ``"radius": 0.0``; saved by JavaScript (``JSON.stringify``), Go or jq 1.6 it
    reads ``"radius": 0`` (JSON has one number type), and a ``p_lower`` of 1.0 reads ``1``. The document says what
    its signature says, yet ``verify_document`` and ``certserve verify`` answered ``INVALID (claims_mismatch): radius
    is 0; signed 0.0``: the plain fields were compared as re-serialised text, so 0 was not 0.0. A boolean still is not
    a number (``certified: 0`` for false, ``class_index: true``) and another value still fails.
    Run against the unfixed code (``_as_json(plain) != _as_json(signed)`` in verify_document): failed there."""
    doc = _uncertified(signer)
    assert verify_document(doc, signer.jwks(), now=NOW)
    as_javascript = {**doc, "radius": 0, "p_lower": 1}
    assert verify_document(as_javascript, signer.jwks(), now=NOW, image_bytes=IMAGE)["certificate"]["radius"] == 0.0
    assert verify_document({"certificate": as_javascript, "logged_at": 1}, signer.jwks(), now=NOW)
    assert verify_document({"results": [as_javascript]}, signer.jwks(), now=NOW)
    for field, value in [("radius", 0.5), ("radius", "0"), ("radius", False), ("certified", 0), ("p_lower", True),
                         ("p_lower", 0.999), ("class_index", -1.5), ("class_name", 0)]:
        with pytest.raises(VerificationError) as info:
            verify_document({**doc, field: value}, signer.jwks(), now=NOW)
        assert info.value.reason == "claims_mismatch", (field, value)
    cert_doc, _ = sign_certificate(signer)
    with pytest.raises(VerificationError) as info:
        verify_document({**cert_doc, "class_index": True}, signer.jwks(), now=NOW)  # 1 is not true
    assert info.value.reason == "claims_mismatch"
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(signer.jwks()))
    saved = tmp_path / "saved-by-a-browser.json"
    saved.write_text(json.dumps(_uncertified(signer, issued_at=int(time.time()))).replace('"radius": 0.0', '"radius": 0'))
    assert '"radius": 0,' in saved.read_text()
    assert run_cli("verify", saved, "--jwks", jwks_file) == 0, capsys.readouterr().err
    assert capsys.readouterr().err.startswith("VALID")


def test_an_empty_image_path_is_refused_not_skipped(signer, tmp_path, capsys):
    """``certserve verify cert.json --image "$IMAGE"`` with IMAGE unset (or a typo) passed ``--image ""``: the empty
    path was taken for "no --image", the image check was skipped and the certificate of ANOTHER image verified VALID,
    exit 0, so a script checking the exit code trusted it for its image. Now exit 2 with a one-line message saying what
    was expected; a real path still checks (exit 1 for another image). Run against the unfixed code
    (``if args.image`` in certification.commands._verify): failed there (exit 0)."""
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(signer.jwks()))
    doc, _ = sign_certificate(signer, issued_at=int(time.time()))
    cert = tmp_path / "cert.json"
    cert.write_text(json.dumps(doc))
    (tmp_path / "other.png").write_bytes(IMAGE[::-1])
    for empty in ("", " "):
        assert run_cli("verify", cert, "--jwks", jwks_file, "--image", empty) == 2
        err = capsys.readouterr().err
        assert "--image is empty" in err and err.count("\n") == 1 and "VALID" not in err
    assert run_cli("verify", cert, "--jwks", jwks_file, "--image", tmp_path / "other.png") == 1
    assert capsys.readouterr().err.startswith("INVALID (image_mismatch)")
