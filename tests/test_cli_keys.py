"""The key commands and ``certserve serve``'s configuration checks as a user meets them: ``keys generate`` on a
full disk or a bad ``--out``, its report of the key that will sign, ``keys jwks`` of public keys only, and ``serve``
refusing a bad bundle path, signing key or audit log path with one line and exit 2 (no traceback).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from certification.signing import Signer, generate_key_files

ROOT = Path(__file__).resolve().parents[1]
# `keys generate` under a file-size limit of 64 bytes: a private key PEM (119 bytes) cannot be written, as on a
# full disk (EFBIG instead of ENOSPC; SIGXFSZ ignored so the write fails instead of killing the process).
LIMITED_GENERATE = ("import argparse, resource, signal, sys\n"
                    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                    "resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))\n"
                    "from certification.commands import add_keys_command\n"
                    "p = argparse.ArgumentParser(); add_keys_command(p.add_subparsers(dest='c'))\n"
                    "a = p.parse_args(['keys', 'generate', '--out', sys.argv[1]]); sys.exit(a.func(a))\n")


def run_cli(*argv) -> int:
    from cli.main import main

    return main([str(a) for a in argv])


def test_generate_on_a_full_disk_leaves_the_key_directory_loadable(tmp_path):
    """Run against the code before 2026-12-05: failed (traceback, exit 1, and an empty certserve-*.pem left that
    stopped the server's next start)."""
    d = tmp_path / "keys"
    _, _, kid = generate_key_files(d)
    before = sorted(p.name for p in d.iterdir())
    r = subprocess.run([sys.executable, "-c", LIMITED_GENERATE, str(d)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("certserve keys generate: cannot write ") and r.stderr.count("\n") == 1, r.stderr
    assert sorted(p.name for p in d.iterdir()) == before
    assert Signer.from_paths(d).kid == kid


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_generate_into_a_file_path_is_one_line_exit_2(tmp_path, capsys, where):
    """Run against the code before 2026-12-05: failed (FileExistsError / NotADirectoryError traceback)."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" if where == "a file" else tmp_path / "afile" / "keys"
    assert run_cli("keys", "generate", "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("certserve keys generate: cannot write ") and err.count("\n") == 1, err


def test_generate_reports_the_key_that_will_sign_and_fails_when_it_is_not_the_new_one(tmp_path, capsys):
    """A hand-named key (``server.pem``) sorts after every generated name, so it keeps signing: ``keys generate``
    says so and exits 1. Run against the code before 2026-12-05: failed (exit 0, the rotation silently kept the old
    key)."""
    d = tmp_path / "keys"
    assert run_cli("keys", "generate", "--out", d) == 0
    out = capsys.readouterr().out
    kid = Signer.from_paths(d).kid
    assert f"active key (signs after a restart): {kid}" in out
    old = Ed25519PrivateKey.generate()
    (d / "server.pem").write_bytes(old.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    os.chmod(d / "server.pem", 0o600)
    hand_kid = Signer.from_paths(d / "server.pem").kid
    assert run_cli("keys", "generate", "--out", d) == 1
    captured = capsys.readouterr()
    assert f"{hand_kid} ({d / 'server.pem'}) will sign, not the new key" in captured.err
    assert Signer.from_paths(d).kid == hand_kid


def test_jwks_of_a_directory_of_public_keys_only(tmp_path, capsys):
    """Retired keys only (their .pub.pem): the key set a verifier needs. Run against the code before 2026-12-05:
    failed (exit 2, "no private Ed25519 key")."""
    d = tmp_path / "keys"
    kids = []
    for _ in range(2):
        private, _, kid = generate_key_files(d)
        private.unlink()
        kids.append(kid)
    assert run_cli("keys", "jwks", "--key", d) == 0
    keys = json.loads(capsys.readouterr().out)["keys"]
    assert sorted(k["kid"] for k in keys) == sorted(kids) and all("d" not in k for k in keys)


def _serve(tmp_path: Path, env: dict[str, str], *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "CERTSERVE_DEVICE": "cpu", "CERTSERVE_THREADS": "1", "CERTSERVE_PORT": "1", **env}
    return subprocess.run([sys.executable, "-m", "cli.main", "serve", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180, check=False)


def _bad_keys(tmp_path: Path) -> dict[str, Path]:
    rsa = generate_private_key(public_exponent=65537, key_size=2048)
    enc = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.BestAvailableEncryption(b"pw"))
    files = {"rsa": rsa.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()), "encrypted": enc, "garbage": b"not a key\n"}
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_bytes(data)
        os.chmod(paths[name], 0o600)
    return paths


@pytest.mark.parametrize("case", ["bundle", "rsa", "encrypted", "garbage", "audit", "audit-link", "signing", "number"])
def test_serve_configuration_errors_are_one_line_exit_2(tmp_path, case):
    """Port 1 (privileged; never reached when the check works). Run against the code before 2026-12-05: failed
    (a uvicorn start-up traceback and exit 3 for each case); the two settings cases then still printed pydantic's
    multi-line dump (4 lines with a documentation link), also failing here. ``audit-link``: a symlinked audit log
    (README supports them) whose target lies under a regular file; the check looked at the link's own directory and
    passed, then the log's start-up mkdir failed (FileExistsError traceback, exit 3): failed here before 2026-12-07."""
    env, args = {}, []
    if case == "signing":
        env = {"CERTSERVE_REQUIRE_SIGNING": "true"}
    elif case == "number":
        env = {"CERTSERVE_MAX_SAMPLES": "abc"}
    elif case == "bundle":
        args = ["--bundle", tmp_path / "nope"]
    elif case == "audit":
        (tmp_path / "afile").write_text("x")
        env = {"CERTSERVE_AUDIT_LOG": str(tmp_path / "afile" / "audit.jsonl")}
    elif case == "audit-link":
        (tmp_path / "afile").write_text("x")
        (tmp_path / "link.jsonl").symlink_to(tmp_path / "afile" / "logs" / "audit.jsonl")
        env = {"CERTSERVE_AUDIT_LOG": str(tmp_path / "link.jsonl")}
    else:
        env = {"CERTSERVE_SIGNING_KEY": str(_bad_keys(tmp_path)[case])}
    r = _serve(tmp_path, env, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("certserve: error: "), r.stderr[-3000:]
    assert {"bundle": "does not exist", "rsa": "not Ed25519", "encrypted": "encrypted", "garbage": "neither",
            "audit": "audit log", "audit-link": "is not a directory", "signing": "CERTSERVE_REQUIRE_SIGNING is true",
            "number": "max_samples (CERTSERVE_MAX_SAMPLES)"}[case] in lines[0]
    assert not (tmp_path / "afile").is_dir()


def test_keys_are_written_where_the_filesystem_has_no_hard_links(tmp_path, monkeypatch):
    """vfat, many SMB/CIFS and FUSE mounts refuse link() (EPERM/EOPNOTSUPP): the key files are then written in
    place, still exclusively (never over an existing file) and complete. Run against the code before this fix
    (2026-12-05, same day; link() failing as on vfat): generation failed with EPERM; this test failed (found by
    review)."""
    import errno
    import os

    from certification.signing import Signer, generate_key_files

    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "keys"
    generate_key_files(out)
    assert not list(out.glob(".*.tmp"))
    assert Signer.from_paths(str(out)).kid
