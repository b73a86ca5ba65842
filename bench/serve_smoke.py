"""One ``certserve serve --device D`` smoke run: start, certify one image by each route, read the backend and memory.

``python -m bench.serve_smoke --device cuda --out DIR`` spawns the real server
(:class:`bench.server_process.ServerProc`) on the embedded bundle, waits for /readyz, then POSTs Fashion-MNIST test
image 9 (a sneaker) to /certify three times: the default route (auto), ``mode=sequential`` and ``mode=cohen``. It
writes ``DIR/serve-smoke.json`` (the answers, the sampler the server logged, start-up seconds, the server's RSS and,
on a GPU, its memory as ``nvidia-smi`` reports it) and prints a short markdown paragraph for docs/benchmarks.md.
Exit 1 when the server does not become ready, an answer is not 200 with a certificate, the server does not exit 0
on SIGTERM, or ``--device cuda`` ran on anything but a CUDA sampler: issue 11's ``serve --device cuda`` smoke
request (bench/device_run.sh runs it on a lent GPU machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROUTES = (("auto", {}), ("sequential", {"mode": "sequential"}), ("cohen", {"mode": "cohen"}))
IMAGE_INDEX = 9  # the first 1,000 test images' sneaker that README's example certifies


def gpu_memory_mib(pid: int) -> float | None:
    """The GPU memory ``nvidia-smi`` reports for process ``pid`` (MiB), or None (no GPU, no nvidia-smi, not listed)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return float(fields[1])
    return None


def logged_sampler(log: str) -> str:
    """The sampler backend the server logged when ready ("certserve ready: bundle B, sampler S"), or ""."""
    for line in log.splitlines():
        if "certserve ready:" in line and "sampler " in line:
            return line.rsplit("sampler ", 1)[1].strip()
    return ""


def certify(url: str, png: bytes, fields: dict) -> dict:
    import httpx

    t0 = time.perf_counter()
    r = httpx.post(url + "/certify", files={"image": ("shoe.png", png, "image/png")}, data=fields, timeout=120)
    body = r.json()
    return {"status": r.status_code, "seconds": time.perf_counter() - t0, "body": body}


def run(device: str, workdir: Path) -> dict:
    from bench.models_and_data import load_test_images
    from bench.server_common import png_bytes
    from bench.server_process import ServerProc

    images, _ = load_test_images(IMAGE_INDEX + 1)
    png = png_bytes(images[IMAGE_INDEX])
    server = ServerProc(workdir, "--device", device, tag=f"smoke-{device}")
    try:
        ready_s = server.wait_ready(timeout=300)
        answers = {name: certify(server.url, png, fields) for name, fields in ROUTES}
        result = {"device": device, "ready_seconds": ready_s, "answers": answers,
                  "sampler": logged_sampler(server.log()), "rss": server.rss(),
                  "gpu_memory_mib": gpu_memory_mib(server.proc.pid)}
        result["exit_code"], result["exit_seconds"] = server.sigterm_and_wait(drain=45.0)  # slow on a busy CPU
    finally:
        server.close()
    result["ok"] = smoke_ok(result)
    return result


def smoke_ok(result: dict) -> bool:
    """Every route answered 200 with a certificate (certified or an abstention), a cuda run sampled on a CUDA
    backend, and the server drained and exited 0 on SIGTERM."""
    answered = all(a["status"] == 200 and "certified" in a["body"] for a in result["answers"].values())
    on_device = result["device"] != "cuda" or result["sampler"].endswith("-cuda")
    return answered and on_device and result.get("exit_code") == 0


def summary(result: dict) -> str:
    lines = [f"`certserve serve --device {result['device']}`: sampler `{result['sampler'] or 'not logged'}`, ready in "
             f"{result['ready_seconds']:.1f} s; test image {IMAGE_INDEX}:"]
    for name, a in result["answers"].items():
        c = a["body"]
        lines.append(f"- {name}: HTTP {a['status']}, {c.get('class_name')}, radius {c.get('radius')} by "
                     f"{c.get('method')} after {c.get('samples')} samples, {a['seconds'] * 1e3:.0f} ms")
    gpu = result["gpu_memory_mib"]
    lines.append(f"- server memory: RSS {result['rss'].get('VmRSS', float('nan')):,.0f} MiB"
                 + (f", GPU {gpu:,.0f} MiB (nvidia-smi)" if gpu is not None else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cuda")
    ap.add_argument("--out", type=Path, default=Path("runs/serve-smoke"))
    args = ap.parse_args(argv)
    try:
        result = run(args.device, args.out)
    except AssertionError as exc:  # ServerProc: exited before ready, or not ready in time (its log's tail included)
        print(f"smoke: FAILED: {exc}")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve-smoke.json").write_text(json.dumps(result, indent=1, default=str))
    print(summary(result))
    print("smoke:", "ok" if result["ok"] else "FAILED")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
