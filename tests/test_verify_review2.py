"""Second review of certificate verification: kid confusion in the key set, a revoked key in the client's cached key
set, and signed claims that contradict each other.

Each test failed on the code before this review (commit 472b757):
- ``test_an_entry_labelled_with_the_servers_kid_verifies_nothing``: a certificate signed by an attacker's key, with
  the honest server's kid in its header and payload, verified VALID (``certserve verify`` printed "VALID ... key
  <honest kid>") under a key set holding the attacker's key under that kid, alone or listed before the honest key (a
  merged key set, or one fetched over http as the default --jwks is); the genuine certificate under the latter set
  failed (bad_signature).
- ``test_client_drops_a_key_removed_from_the_key_set``: ``CertserveClient(verify=True)`` read the key set once and
  kept it for its whole life, so a key removed from the server's JWKS (or from a ``jwks`` file), e.g. revoked after
  a compromise, kept verifying certificates; a ``jwks`` file or URL was never read again on a rotation either.
- ``test_contradictory_signed_claims_are_not_valid``: certificates signed with a radius above sigma * Phi^-1(p_lower),
  a radius without p_lower, ``certified`` contradicting the class, or a guarantee kind not the method's verified
  VALID (the server signs what it computed: such a certificate is a server fault, and its radius is not certified).
"""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import numpy as np
import pytest
from joserfc import jws
from joserfc.jwk import OKPKey
from scipy.special import ndtr

import server.client as client_module
from certification.signing import REGISTRY, Signer, canonical_json, certificate_claims, generate_key_files
from certification.verify import VerificationError, verify_certificate, verify_document
from server.client import CertserveClient
from smoothing.radius import radius_from_probability, radius_from_probit
from test_verify import IMAGE, NOW, TENSOR, make_certificate, run_cli, sign_certificate, tensor_sha256


@pytest.fixture
def signer(tmp_path) -> Signer:
    generate_key_files(tmp_path / "keys")
    return Signer.from_paths(tmp_path / "keys")


def reason(doc, jwks) -> str:
    with pytest.raises(VerificationError) as info:
        verify_document(doc, jwks, now=NOW, image_bytes=IMAGE)
    return info.value.reason


def test_an_entry_labelled_with_the_servers_kid_verifies_nothing(signer, tmp_path, capsys):
    attacker = OKPKey.generate_key("Ed25519")
    cert = make_certificate(radius=0.9, p_lower=0.9999)
    claims = certificate_claims(cert, input_sha256=hashlib.sha256(IMAGE).hexdigest(),
                                tensor_sha256=tensor_sha256(TENSOR), tensor_shape=TENSOR.shape,
                                preprocessing=cert["preprocessing"], model_name="fmnist-sigma0.25", model_version="1",
                                manifest_sha256="c" * 64, sigma=0.25, kid=signer.kid, server_version="0.1.0",
                                issued_at=NOW, model_sha256="f" * 64)
    forged = {**cert, "signature": jws.serialize_compact(
        {"alg": "EdDSA", "kid": signer.kid, "typ": "certserve-certificate+jwt"}, canonical_json(claims), attacker,
        registry=REGISTRY)}
    labelled = {**attacker.as_dict(private=False), "kid": signer.kid}
    genuine, _ = sign_certificate(signer)
    for keys in ([labelled], [labelled, *signer.jwks()["keys"]]):
        assert reason(forged, {"keys": keys}) == "bad_signature", len(keys)
    assert verify_document(genuine, {"keys": [labelled, *signer.jwks()["keys"]]}, now=NOW, image_bytes=IMAGE)
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [labelled]}))
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    assert run_cli("verify", tmp_path / "forged.json", "--jwks", tmp_path / "jwks.json") == 1
    assert capsys.readouterr().err.startswith("INVALID (bad_signature): ")


def _client(served: dict, **kwargs) -> CertserveClient:
    """A verifying client whose server answers ``served["cert"]`` to /certify and ``served["jwks"]`` as its key set."""
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=served["jwks"] if request.url.path.endswith("jwks.json") else served["cert"])

    client = CertserveClient("http://certserve.test", verify=True, retries=0, **kwargs)
    client._http.close()
    client._http = httpx.Client(base_url="http://certserve.test", transport=httpx.MockTransport(answer))
    return client


def test_client_drops_a_key_removed_from_the_key_set(tmp_path, monkeypatch):
    generate_key_files(tmp_path / "old")
    generate_key_files(tmp_path / "new")
    old, new = Signer.from_paths(tmp_path / "old"), Signer.from_paths(tmp_path / "new")
    both, only_old, only_new = ({"keys": old.jwks()["keys"] + new.jwks()["keys"]}, old.jwks(), new.jwks())
    issued = int(time.time())
    by_old, by_new = sign_certificate(old, issued_at=issued)[0], sign_certificate(new, issued_at=issued)[0]
    clock = [1000.0]
    monkeypatch.setattr(client_module, "_monotonic", lambda: clock[0], raising=False)
    jwks_file = tmp_path / "jwks.json"
    for source in ("server", "file"):
        kwargs = {"jwks": jwks_file} if source == "file" else {}
        served = {"jwks": both, "cert": by_old}
        jwks_file.write_text(json.dumps(both))
        with _client(served, **kwargs) as client:
            assert client.certify(IMAGE)["signature"] == by_old["signature"]
            served["jwks"] = only_new  # the old key is revoked: removed from the set
            jwks_file.write_text(json.dumps(only_new))
            clock[0] += 10.0  # within the set's max-age the set read is still used
            assert client.certify(IMAGE)
            clock[0] += 300.0
            with pytest.raises(VerificationError) as info:
                client.certify(IMAGE)
            assert info.value.reason == "unknown_kid", source
        # a rotation: a certificate by a key added after the set was read verifies after one re-read
        served = {"jwks": only_old, "cert": by_old}
        jwks_file.write_text(json.dumps(only_old))
        with _client(served, **kwargs) as client:
            assert client.certify(IMAGE)
            served.update(jwks=both, cert=by_new)
            jwks_file.write_text(json.dumps(both))
            assert client.certify(IMAGE)["signature"] == by_new["signature"], source


@pytest.mark.parametrize("changes", [
    {"radius": 5.0},  # p_lower 0.9931 at sigma 0.25 supports at most 0.6155
    {"radius": 0.62},
    {"p_lower": None},
    {"p_lower": 0.5},
    {"certified": False},  # with class 1 and radius 0.6125
    {"class_index": -1, "class_name": None},  # certified True
    {"certified": False, "class_index": -1, "class_name": None},  # radius 0.6125 kept
    {"method": "surrogate"},  # guarantee kind anytime-valid
    {"guarantee": {"kind": "clopper-pearson", "alpha": 0.001, "statement": "per input"}},  # method sequential
    {"guarantee": {"kind": "anytime-valid", "alpha": 1.5, "statement": "per input"}},
    {"method": "bayes", "guarantee": {"kind": "bayes", "alpha": 0.001, "statement": "trust me"}},
    {"radius": -0.1},
    {"method": ["sequential"]},
])
def test_contradictory_signed_claims_are_not_valid(signer, changes, tmp_path, capsys):
    doc, token = sign_certificate(signer, **changes)
    with pytest.raises(VerificationError) as info:
        verify_certificate(token, signer.jwks(), now=NOW)
    assert info.value.reason == "inconsistent", changes
    (tmp_path / "jwks.json").write_text(json.dumps(signer.jwks()))
    (tmp_path / "cert.json").write_text(json.dumps(doc))
    assert run_cli("verify", tmp_path / "cert.json", "--jwks", tmp_path / "jwks.json") == 1
    assert capsys.readouterr().err.startswith("INVALID (inconsistent): ")


def _claims(route: str, class_index: int, radius: float, p_lower, sigma: float) -> dict:
    kind = {"surrogate": "conformal-marginal", "sequential": "anytime-valid", "fixed": "clopper-pearson",
            "cohen": "clopper-pearson"}[route]
    return {"certificate": {"certified": class_index >= 0, "class_index": class_index,
                            "class_name": "c" if class_index >= 0 else None, "radius": radius, "p_lower": p_lower,
                            "method": route, "guarantee": {"kind": kind, "alpha": 0.001, "statement": "s"}},
            "model": {"sigma": sigma}}


def test_what_the_server_computes_is_always_consistent():
    """The check never fails a certificate the server's own arithmetic gives (surrogate: p = Phi(z) next to radius
    sigma * z; engine routes: radius = sigma * Phi^-1(p)), down to p a few ulp above 1/2 and up to p near 1 where one
    ulp of p moves Phi^-1 by percent."""
    from certification.verify import _check_consistent

    rng = np.random.default_rng(2024)
    zs = np.concatenate([rng.uniform(1e-12, 9.0, 4000), np.geomspace(1e-15, 1e-3, 200), np.linspace(7.5, 8.3, 400)])
    for sigma in (0.12, 0.25, 1.0, 3.7):
        for z in zs:
            p = float(ndtr(z))
            radius = float(radius_from_probit(z, sigma))
            if radius > 0 and p > 0.5:
                _check_consistent(_claims("surrogate", 3, radius, p, sigma))
        for p in np.concatenate([rng.uniform(0.5, 1.0, 2000), 0.5 + np.arange(1, 50) * 2.0 ** -53,
                                 1 - np.arange(1, 50) * 2.0 ** -53]):
            p = float(p)
            radius = float(radius_from_probability(p, sigma))
            for route in ("sequential", "fixed", "cohen"):
                _check_consistent(_claims(route, 2 if p > 0.5 else -1, radius if p > 0.5 else 0.0,
                                          p, sigma))
    _check_consistent(_claims("surrogate", -1, 0.0, None, 0.25))  # an abstention
    _check_consistent(_claims("sequential", -1, 0.0, 0.31, 0.25))
    _check_consistent(_claims("cohen", 4, 0.0, 0.5 + 2.0 ** -52, 0.25))  # certified, radius rounded to 0


def test_client_verifies_with_a_key_set_another_thread_drops_meanwhile(tmp_path, monkeypatch):
    """_checked read self._keyset twice (the max-age check, then verify_document): another thread dropping it in
    between (its certificate named an unknown kid) made this one verify against None (TypeError or jwks_unavailable
    for a good certificate). Simulated deterministically: the clock read between the two is where the drop lands."""
    generate_key_files(tmp_path / "k")
    signer = Signer.from_paths(tmp_path / "k")
    cert = sign_certificate(signer, issued_at=int(time.time()))[0]
    holder: list = []

    def clock():
        if holder and holder[0]._keyset is not None:
            holder[0]._keyset = None  # the other thread's "unknown_kid: read again"
        return 1000.0

    monkeypatch.setattr(client_module, "_monotonic", clock, raising=False)
    with _client({"jwks": signer.jwks(), "cert": cert}) as client:
        assert client.certify(IMAGE)["signature"] == cert["signature"]  # reads the set (nothing to drop yet)
        holder.append(client)
        assert client.certify(IMAGE)["signature"] == cert["signature"]


@pytest.mark.parametrize("params, changes", [
    ({"alpha": 0.0001}, {}),  # a valid certificate at alpha 0.001 answered for a request at 0.0001
    ({"mode": "cohen"}, {}),  # a sequential certificate answered for mode=cohen
    ({"per_input": True}, {"method": "surrogate", "guarantee": {"kind": "conformal-marginal", "alpha": 0.001,
                                                                "statement": "marginal"}, "samples": 0,
                           "stopped_by": "certified", "fallback_reason": None}),
])
def test_client_refuses_a_valid_certificate_that_does_not_answer_its_request(signer, params, changes):
    """CertserveClient(verify=True) checked signature, claims and image only: a genuine signed certificate of the same
    image at a weaker alpha (or another method, or a marginal guarantee for a per-input request) passed as the answer
    to a stricter request, e.g. replayed by a proxy or answered by a misconfigured server. Run against the client
    before this test: all three were returned as verified."""
    cert, _ = sign_certificate(signer, issued_at=int(time.time()), **changes)
    served = {"jwks": signer.jwks(), "cert": cert}
    with _client(served) as client:
        with pytest.raises(VerificationError) as info:
            client.certify(IMAGE, **params)
        assert info.value.reason == "not_requested" and "request" in str(info.value)
        assert client.certify(IMAGE, alpha=0.001, mode=changes.get("method", "sequential"))  # what it answers
