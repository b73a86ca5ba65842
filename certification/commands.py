"""``certserve keys ...`` and ``certserve verify`` (argparse; heavy imports inside the handlers)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

DEFAULT_JWKS = "http://127.0.0.1:8000/.well-known/jwks.json"


def add_keys_command(sub) -> None:
    keys = sub.add_parser("keys", help="signing keys for certificates (Ed25519)")
    keys_sub = keys.add_subparsers(dest="keys", required=True)
    gen = keys_sub.add_parser("generate", help="write a new Ed25519 key pair (private 0600, public .pub.pem)")
    gen.add_argument("--out", required=True, help="directory for the key files (created 0700 if missing)")
    gen.set_defaults(func=_keys_generate)
    jwks = keys_sub.add_parser("jwks", help="print the public key set (JWKS) of configured keys, for offline verify")
    jwks.add_argument("--key", default=os.environ.get("CERTSERVE_SIGNING_KEY"),
                      help="key file, directory or list (default: $CERTSERVE_SIGNING_KEY)")
    jwks.set_defaults(func=_keys_jwks)


def add_verify_command(sub) -> None:
    ver = sub.add_parser("verify", help="verify a signed certificate: signature, image hash, age",
                         description="Exit 0 and print the verified claims when valid; otherwise exit 1 with a "
                                     "one-line reason (exit 2: the certificate or key set could not be read).")
    ver.add_argument("cert", help="a certificate JSON file (response or audit line) or a compact JWS; - = stdin")
    ver.add_argument("--image", help="the image file that was certified: its SHA-256 must match")
    ver.add_argument("--jwks", default=os.environ.get("CERTSERVE_JWKS", DEFAULT_JWKS),
                     help="key set: a file or an http(s) URL (default: $CERTSERVE_JWKS or %(default)s)")
    ver.add_argument("--max-age", type=positive_seconds, default=None,
                     help="reject certificates issued more than S seconds ago (a finite number > 0)")
    ver.set_defaults(func=_verify)


def _keys_generate(args) -> int:
    """Exit 0: the new key is written and will sign; 1: written, but another key in --out will sign (or the directory
    does not load); 2: nothing written (cannot write --out)."""
    from certification.signing import generate_key_files

    try:
        private, public, kid = generate_key_files(args.out)
    except OSError as exc:
        print(f"certserve keys generate: cannot write {exc.filename or args.out}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    print(f"kid {kid}\nprivate key {private} (0600; keep it secret)\npublic key  {public}")
    if not _new_key_signs(args.out, kid):
        return 1
    print(f"serve with: CERTSERVE_SIGNING_KEY={os.path.abspath(args.out)} certserve serve")
    return 0


def _new_key_signs(out: str, kid: str) -> bool:
    """Load ``out`` as the server would and say which key signs; False (with a message) when not the new one."""
    from certification.signing import Signer, SigningKeyError

    try:
        signer = Signer.from_paths(out)
    except SigningKeyError as exc:
        print(f"certserve keys generate: the new key {kid} is written, but {out} does not load: {exc}",
              file=sys.stderr)
        return False
    if signer.kid != kid:
        print(f"certserve keys generate: key {signer.kid} ({signer.active_path}) will sign, not the new key {kid}: "
              f"its file name sorts after the new one; move it out of {out} (or keep only its .pub.pem) to rotate",
              file=sys.stderr)
        return False
    print(f"active key (signs after a restart): {kid}")
    return True


def _keys_jwks(args) -> int:
    from certification.signing import SigningKeyError, public_jwks

    if not args.key:
        print("certserve keys jwks: no key given (--key or CERTSERVE_SIGNING_KEY)", file=sys.stderr)
        return 2
    try:
        print(json.dumps(public_jwks(args.key), indent=2))
    except SigningKeyError as exc:
        print(f"certserve keys jwks: {exc}", file=sys.stderr)
        return 2
    return 0


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0 (``nan``, ``inf``, 0 and negatives are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def _verify(args) -> int:
    from certification.verify import (VerificationError, load_jwks, parse_document, verify_certificate,
                                      verify_document)

    if args.image is not None and not args.image.strip():  # `--image "$IMG"` with IMG unset: never skip the check
        print("certserve verify: --image is empty; expected the path of the certified image file", file=sys.stderr)
        return 2
    if not str(args.jwks).strip():  # `--jwks "$KEYS"` or CERTSERVE_JWKS= set empty
        print("certserve verify: --jwks is empty; expected a key set (JWKS) file or an http(s) URL", file=sys.stderr)
        return 2
    try:
        text = _certificate_text(args.cert)
        image = Path(args.image).read_bytes() if args.image is not None else None
    except OSError as exc:
        print(f"certserve verify: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except UnicodeDecodeError:
        print("INVALID (malformed): the certificate file is not text (UTF-8)", file=sys.stderr)
        return 1
    text = text.removeprefix("\ufeff")  # a byte-order mark (Notepad, PowerShell's Out-File) is not the certificate's
    try:
        keyset = load_jwks(args.jwks)
        text = text.strip()
        if text.startswith("{"):
            claims = verify_document(parse_document(text), keyset, image_bytes=image, max_age=args.max_age)
        else:
            claims = verify_certificate(text, keyset, image_bytes=image, max_age=args.max_age)
    except VerificationError as exc:
        print(f"INVALID ({exc.reason}): {exc}", file=sys.stderr)
        return 2 if exc.reason in ("jwks_unavailable", "bad_jwks") else 1
    print(json.dumps(claims, indent=2, sort_keys=True))
    cert = claims["certificate"]
    checked = "signature" + (", image" if image is not None else "") + (", age" if args.max_age is not None else "")
    print(f"VALID ({checked}): class {cert['class_index']} radius {cert['radius']} {cert['method']} "
          f"[{cert['guarantee']['kind']}, alpha {cert['guarantee']['alpha']}] model {claims['model']['name']} "
          f"{claims['model']['version']} key {claims['server']['kid']}",
          file=sys.stderr)
    return 0


def _certificate_text(cert: str) -> str:
    """The certificate ``verify`` was given: standard input for ``-``, the compact JWS itself when the argument is one
    (``eyJ...``: a JSON header, three dot-separated parts) and names no file, else the file's text."""
    if cert == "-":
        return sys.stdin.read()
    if cert.startswith("eyJ") and cert.count(".") == 2 and not os.path.exists(cert):
        return cert
    return Path(cert).read_text(encoding="utf-8")
