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


def test_a_compact_jws_given_on_the_command_line_verifies(signer, tmp_path, capsys):
    """The help says the argument is "a certificate JSON file ... or a compact JWS": ``certserve verify eyJ...`` (the
    token pasted) was read as a FILE NAME and exited 2, "cannot read eyJ...: File name too long". Now a token that
    names no file is verified as the token (a tampered one is INVALID, exit 1); a file path still reads the file.
    Run against the code before (2026-12-07, Path(args.cert).read_text for every argument but -): failed (exit 2)."""
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(signer.jwks()))
    _, token = sign_certificate(signer, issued_at=int(time.time()))
    assert run_cli("verify", token, "--jwks", jwks_file, "--image", _image_file(tmp_path)) == 0
    assert capsys.readouterr().err.startswith("VALID (signature, image)")
    head, payload, sig = token.split(".")
    forged = ".".join([head, payload, ("A" if sig[0] != "A" else "B") + sig[1:]])
    assert run_cli("verify", forged, "--jwks", jwks_file) == 1
    assert capsys.readouterr().err.startswith("INVALID (")
    (tmp_path / "token.jws").write_text(token)
    assert run_cli("verify", tmp_path / "token.jws", "--jwks", jwks_file) == 0
    capsys.readouterr()
    assert run_cli("verify", tmp_path / "eyJ.missing.jws", "--jwks", jwks_file) == 2  # a path: a missing file
    assert "certserve verify: cannot read " in capsys.readouterr().err


def test_an_empty_key_set_is_refused_saying_what_was_expected(signer, tmp_path, capsys):
    """``--jwks "$KEYS"`` with KEYS unset (or CERTSERVE_JWKS set empty) said "cannot read key set : Is a directory"
    (the empty path read as the current directory). Now exit 2 naming the flag and what it expects. Run against the
    code before (2026-12-07): failed (that message)."""
    doc, _ = sign_certificate(signer, issued_at=int(time.time()))
    cert = tmp_path / "cert.json"
    cert.write_text(json.dumps(doc))
    for empty in ("", " "):
        assert run_cli("verify", cert, "--jwks", empty) == 2
        err = capsys.readouterr().err
        assert err == "certserve verify: --jwks is empty; expected a key set (JWKS) file or an http(s) URL\n", err


def _image_file(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(IMAGE)
    return path
