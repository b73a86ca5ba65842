"""Signed certificates: what signing and the audit log add to a certificate, in microseconds and on the HTTP path.

Two parts, one run, written as section ``signing`` of ``docs/benchmarks.md``:

1. In process, per operation (median and p99 of ``--n`` calls each, a real key, a real certificate of the embedded
   bundle): building the claims, the tensor hash, one Ed25519 JWS signature, one audit line (page cache), the whole
   seal (hash + sign + audit) against the seal without key or log, and one verification.
2. Over HTTP: three ``certserve serve`` processes -- unsigned, signed, signed + audit log -- at once (idle ones cost
   no CPU), and the surrogate path (POST /certify, a test image the surrogate answers) driven at ``--rate`` req/s by
   the open-loop Poisson generator of :mod:`bench.http_load`, in ``--rounds`` rounds of ``--segment`` seconds per
   server, the order rotated every round so that drift in the machine's load falls on all three alike. Reported: the
   p50/p99 of each server in each round, the median over rounds of the per-round differences to unsigned, and the
   seal time each server measured itself under that load (``certserve_seal_duration_seconds``), which decides the
   verdict: on a shared machine the client-side differences are often smaller than their own noise.

Run as ``python -m bench.signing`` (about 4 minutes with the defaults on the 2-core development machine).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.http_load import run_open_loop
from bench.machine import CpuMeter, code_version, describe_load, machine_description
from bench.report import PENDING_TOTAL, section_text, write_report
from bench.server_common import markdown_table, multipart_body, png_bytes
from bench.server_process import ServerProc

TARGET_P50_MS = 0.3
CONFIGS = ("unsigned", "signed", "signed+audit")


def _timed(fn, n: int) -> dict:
    fn()  # warm
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return {"median_us": float(np.median(times)), "p99_us": float(np.percentile(times, 99))}


def micro(n: int, workdir: Path) -> dict:
    """Per-operation cost in microseconds, in this process."""
    import asyncio

    from certification.audit import AuditLog
    from certification.config import ServiceConfig
    from certification.plan import CertifyParams
    from certification.seal import Sealer
    from certification.service import CertificationService
    from certification.signing import Signer, certificate_claims, generate_key_files, tensor_sha256
    from certification.verify import load_jwks, verify_certificate
    from calibration.data import load_fashion_mnist
    from models.bundle import load_bundle

    generate_key_files(workdir / "keys")
    signer = Signer.from_paths(workdir / "keys")
    bundle = load_bundle()
    image = load_fashion_mnist().x_test[2]
    service = CertificationService(bundle, ServiceConfig(device="cpu", threads=1))
    cert = asyncio.run(service._certify(image, CertifyParams(), request_id="bench"))  # surrogate route, not sealed
    plain, sealer = Sealer(bundle), Sealer(bundle, signer=signer)
    audited = Sealer(bundle, signer=signer, audit=AuditLog(workdir / "audit.jsonl", max_bytes=0))
    seal_args = {"input_sha256": "0" * 64, "input_encoding": "file"}
    facts = dict(input_sha256="0" * 64, tensor_sha256="1" * 64, tensor_shape=image.shape, preprocessing=[],
                 kid=signer.kid, server_version="0", **sealer.model)
    claims = certificate_claims(cert.model_dump(), **facts)
    token = signer.sign(claims)
    keyset = load_jwks(signer.jwks())
    log = AuditLog(workdir / "lines.jsonl", max_bytes=0)
    record = {"certificate": plain.seal(cert.model_copy(), image, **seal_args).model_dump(mode="json") |
              {"signature": token}}
    ops = {
        "claims (model_dump + certificate_claims)": lambda: certificate_claims(cert.model_dump(), **facts),
        "tensor_sha256 (1x28x28 float32)": lambda: tensor_sha256(image),
        "Ed25519 JWS signature (Signer.sign)": lambda: signer.sign(claims),
        "audit line (AuditLog.append, page cache)": lambda: log.append(record),
        "seal, no key, no log (input hashes only)": lambda: plain.seal(cert.model_copy(), image, **seal_args),
        "seal, signed": lambda: sealer.seal(cert.model_copy(), image, **seal_args),
        "seal, signed + audit line": lambda: audited.seal(cert.model_copy(), image, **seal_args),
        "verification (verify_certificate)": lambda: verify_certificate(token, keyset),
    }
    out = {name: _timed(fn, n) for name, fn in ops.items()}
    log.close()
    audited.close()
    service.stop(0)
    line_bytes = len((workdir / "lines.jsonl").read_bytes()) // (n + 1)
    out["_sizes"] = {"jws_bytes": len(token), "audit_line_bytes": line_bytes}
    return out


def http_ab(args, workdir: Path) -> tuple[dict, dict]:
    """Per config and round: the open-loop latency summary at ``args.rate`` req/s."""
    from certification.signing import generate_key_files

    generate_key_files(workdir / "keys-http")
    base = {"CERTSERVE_DEVICE": "cpu", "CERTSERVE_THREADS": str(args.threads), "CERTSERVE_LOG_LEVEL": "warning"}
    envs = {"unsigned": base, "signed": {**base, "CERTSERVE_SIGNING_KEY": str(workdir / "keys-http")},
            "signed+audit": {**base, "CERTSERVE_SIGNING_KEY": str(workdir / "keys-http"),
                             "CERTSERVE_AUDIT_LOG": str(workdir / "audit-http.jsonl")}}
    from bench.models_and_data import load_test_images

    images, _ = load_test_images(8)
    body = multipart_body(png_bytes(images[2]))  # a trouser: answered by the surrogate in auto mode
    servers = {name: ServerProc(workdir, env=env, tag=name.replace("+", "-")) for name, env in envs.items()}
    rounds: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    try:
        for srv in servers.values():
            srv.wait_ready()
        import httpx

        for name, srv in servers.items():  # warm each request path
            for _ in range(300):
                r = httpx.post(srv.url + "/certify", content=body, timeout=30,
                               headers={"content-type": "multipart/form-data; boundary=certservebenchboundary7f3a"})
                assert r.status_code == 200 and r.json()["method"] == "surrogate", r.text
                assert (r.json()["signature"] is not None) == (name != "unsigned")
        before = {name: srv.metrics() for name, srv in servers.items()}
        for k in range(args.rounds):
            order = CONFIGS[k % 3:] + CONFIGS[:k % 3]
            for name in order:
                print(f"  round {k + 1}/{args.rounds}: {name}", flush=True)
                rounds[name].append(run_open_loop(servers[name].url, body, args.rate, args.segment, [args.seed, k]))
        seal = {name: seal_under_load(before[name], srv.metrics()) for name, srv in servers.items()}
        audit_lines = (workdir / "audit-http.jsonl").read_bytes().count(b"\n")
    finally:
        for srv in servers.values():
            srv.stop()
    return rounds, {"audit_lines": audit_lines, "seal": seal}


def seal_under_load(before: dict, after: dict) -> dict:
    """The servers' own ``certserve_seal_duration_seconds`` over the measured rounds: mean, and the bucket bounds
    that hold the median and the 99th percentile."""
    name = "certserve_seal_duration_seconds"
    count = after[f"{name}_count"] - before.get(f"{name}_count", 0.0)
    total = after[f"{name}_sum"] - before.get(f"{name}_sum", 0.0)
    buckets = sorted((float(k.split('le="')[1].rstrip('"}')), v - before.get(k, 0.0)) for k, v in after.items()
                     if k.startswith(f"{name}_bucket") and "+Inf" not in k)

    def bound(q):
        return next((le * 1e6 for le, c in buckets if c >= q * count), float("inf"))

    return {"count": count, "mean_us": total / count * 1e6 if count else float("nan"), "p50_le_us": bound(0.5),
            "p99_le_us": bound(0.99)}


def summarize(rounds: dict[str, list[dict]]) -> dict:
    out = {}
    for name in CONFIGS:
        rs = rounds[name]
        out[name] = {"p50_ms": float(np.median([r["p50"] for r in rs])),
                     "p99_ms": float(np.median([r["p99"] for r in rs])), "requests": int(sum(r["n"] for r in rs)),
                     "non_200": int(sum(v for r in rs for c, v in r["codes"].items() if c != "200"))}
        if name != "unsigned":
            base = rounds["unsigned"]
            out[name]["delta_p50_ms"] = float(np.median([a["p50"] - b["p50"] for a, b in zip(rs, base)]))
            out[name]["delta_p99_ms"] = float(np.median([a["p99"] - b["p99"] for a, b in zip(rs, base)]))
    return out


def report(args, micro_us: dict, rounds: dict, summary: dict, extra: dict) -> tuple[str, dict]:
    rows = [[name, f"{v['median_us']:.1f}", f"{v['p99_us']:.1f}"] for name, v in micro_us.items() if name[0] != "_"]
    micro_table = markdown_table(["operation", "median us", "p99 us"], rows)
    per_round = markdown_table(["round"] + [f"{c} p50 / p99 ms" for c in CONFIGS],
                               [[str(k + 1)] + [f"{rounds[c][k]['p50']:.2f} / {rounds[c][k]['p99']:.2f}"
                                                for c in CONFIGS] for k in range(args.rounds)])
    seal = markdown_table(["server", "certificates sealed", "mean us", "p50 <= us", "p99 <= us"],
                          [[c, f"{s['count']:,.0f}", f"{s['mean_us']:.1f}", f"{s['p50_le_us']:g}",
                            f"{s['p99_le_us']:g}"] for c, s in extra["seal"].items()])
    agg = markdown_table(["server", "requests", "non-200", "p50 ms (median of rounds)", "p99 ms (median of rounds)",
                          "p50 - unsigned (median of paired rounds)", "p99 - unsigned"],
                         [[c, f"{s['requests']:,}", str(s["non_200"]), f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}",
                           f"**{s['delta_p50_ms']:+.3f} ms**" if "delta_p50_ms" in s else "-",
                           f"{s['delta_p99_ms']:+.3f} ms" if "delta_p99_ms" in s else "-"] for c, s in summary.items()])
    delta = summary["signed"]["delta_p50_ms"]
    paired = [a["p50"] - b["p50"] for a, b in zip(rounds["signed"], rounds["unsigned"])]
    spread = float(np.subtract(*np.percentile(paired, [75, 25])))
    signed_seal = extra["seal"]["signed"]
    server_ok = max(signed_seal["mean_us"], signed_seal["p50_le_us"]) <= TARGET_P50_MS * 1e3
    verdict = "PASS" if server_ok else "FAIL"
    ab = ("within target" if delta <= TARGET_P50_MS else
          f"not resolved: the paired differences spread over {spread:.2f} ms (IQR)" if abs(delta) < spread else
          "over target")
    sizes = micro_us["_sizes"]
    body = f"""Target: signing adds <= {TARGET_P50_MS} ms to the surrogate path's p50 at {args.rate:g} req/s.

**In process** ({args.n:,} calls per operation, after one warm-up call; a real Ed25519 key, a real surrogate
certificate of the embedded bundle; a JWS is {sizes['jws_bytes']:,} bytes, an audit line
{sizes['audit_line_bytes']:,} bytes):

{micro_table}

**Over HTTP**: three `certserve serve` processes (cpu, {args.threads} threads) -- unsigned; signed
(`CERTSERVE_SIGNING_KEY`); signed + audit log (`CERTSERVE_AUDIT_LOG`, page cache, no fsync) -- each driven in turn
by the open-loop Poisson generator of `bench/http_load.py` at {args.rate:g} req/s for {args.segment:g} s per round,
{args.rounds} rounds, the order rotated every round (latency from the scheduled send time; the generator shares the
machine). {extra['audit_lines']:,} audit lines were written by the audited server.

{per_round}

{agg}

The seal measured inside each server during these rounds (`certserve_seal_duration_seconds`: input hashes, plus the
signature, plus the audit line; mean from the histogram's sum and count, percentiles as histogram bucket bounds):
this is the time signing and the audit line add to each request on the request path, under the load above.

{seal}

**Verdict: {verdict}** (the request-path time signing adds, measured in the signed server under this load: mean
{signed_seal['mean_us']:.0f} us, median <= {signed_seal['p50_le_us']:g} us; target <= {TARGET_P50_MS * 1e3:.0f} us).
HTTP A/B: signing moved the client-side p50 by {delta:+.3f} ms (median of the paired per-round differences), signing +
audit by {summary['signed+audit']['delta_p50_ms']:+.3f} ms: {ab}. Non-200 answers (client-side timeouts or
connection errors under the machine's load) are counted per server above.
"""
    data = {"micro_us": micro_us, "summary": summary, "seal_under_load": extra["seal"], "ab": ab, "rate": args.rate,
            "rounds": args.rounds, "segment_s": args.segment, "verdict": verdict}
    return body, data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="calls per in-process operation")
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--segment", type=float, default=4.0, help="seconds per server per round")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads of each server's sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/benchmarks.md")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="certserve-signing-"))
    machine, code = machine_description(), code_version()
    meter, started = CpuMeter(), time.perf_counter()
    print("in-process costs", flush=True)
    micro_us = micro(args.n, workdir)
    print("HTTP A/B", flush=True)
    rounds, extra = http_ab(args, workdir)
    summary = summarize(rounds)
    seconds = time.perf_counter() - started
    body, data = report(args, micro_us, rounds, summary, extra)
    cmd = "python -m bench.signing " + shlex.join(sys.argv[1:] if argv is None else argv)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    runinfo = {"command": cmd.strip(), "date": now, "seconds": seconds, "machine": machine, "code": code,
               "load": describe_load(meter.stop())}
    text = section_text("(g) Signed certificates", body, data, runinfo).replace(
        PENDING_TOTAL, f"(whole invocation: {seconds:.0f} s)")
    write_report(Path(args.out), {"signing": (text, dict(data, _run=runinfo))})
    print(text)
    return 0 if data["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
