"""A real Prometheus (Debian's ``/usr/bin/prometheus``) scrapes a real ``certserve serve`` subprocess every second;
after auto (surrogate) and sequential certifications its query API must show them in ``certserve_requests_total``
and ``certserve_request_duration_seconds_count``. ``promtool check metrics`` must accept the exposition text.

Everything listens on free loopback ports; every wait is a bounded poll; the processes are killed in ``finally``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import test_server_process as tsp  # the Server helper (spawn on a free port, wait for /readyz); module import only

PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
SCRAPE_WAIT = 45.0  # generous: 1 s scrape interval, slow 2-core machine


def _png() -> bytes:
    from calibration.data import load_fashion_mnist
    from PIL import Image
    import io

    x = load_fashion_mnist().x_test[tsp.EASY, 0]
    buf = io.BytesIO()
    Image.fromarray(np.round(x * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _query(base: str, expr: str) -> float | None:
    r = httpx.get(base + "/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    if not result:
        return None
    return float(result[0]["value"][1])


def _wait_for(base: str, expr: str, predicate, timeout: float = SCRAPE_WAIT) -> float:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = _query(base, expr)
            if last is not None and predicate(last):
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"Prometheus query {expr!r} did not reach the expected value in {timeout}s (last: {last})")


@pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is not installed (apt-get install prometheus)")
def test_prometheus_scrapes_certifications(tmp_path):
    srv = tsp.Server(tmp_path, {"CERTSERVE_MAX_SAMPLES": "1000", "CERTSERVE_DRAIN_SECONDS": "2"})
    prom = None
    prom_log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed in finally
    try:
        srv.wait_ready()
        prom_port = tsp.free_port()
        base = f"http://127.0.0.1:{prom_port}"
        (tmp_path / "prometheus.yml").write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: certserve
    scrape_interval: 1s
    scrape_timeout: 900ms
    static_configs:
      - targets: ['127.0.0.1:{srv.port}']
""")
        prom = subprocess.Popen([PROMETHEUS, f"--web.listen-address=127.0.0.1:{prom_port}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--config.file={tmp_path / 'prometheus.yml'}"],
                                stdout=prom_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # Prometheus is up and has scraped the idle server at least once: the target reports up == 1
        _wait_for(base, 'up{job="certserve"}', lambda v: v == 1.0)
        _wait_for(base, "certserve_ready", lambda v: v == 1.0)

        png = _png()
        statuses = []
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            for _ in range(5):  # auto: the surrogate answers
                statuses.append(client.post("/certify", files={"image": ("t.png", png, "image/png")}))
            for _ in range(3):  # sequential: the engine answers
                statuses.append(client.post("/certify", files={"image": ("t.png", png, "image/png")},
                                            data={"mode": "sequential", "max_samples": "500", "alpha": "0.01"}))
        assert [r.status_code for r in statuses] == [200] * 8, [r.text for r in statuses if r.status_code != 200]
        methods = sorted(r.json()["method"] for r in statuses)
        assert methods == ["sequential"] * 3 + ["surrogate"] * 5

        total = _wait_for(base, "sum(certserve_requests_total)", lambda v: v >= 8)
        assert total == 8.0
        seq = _wait_for(base, 'sum(certserve_requests_total{method="sequential"})', lambda v: v >= 3)
        sur = _wait_for(base, 'sum(certserve_requests_total{method="surrogate"})', lambda v: v >= 5)
        assert (seq, sur) == (3.0, 5.0)
        count = _wait_for(base, "sum(certserve_request_duration_seconds_count)", lambda v: v >= 8)
        assert count == 8.0
        # the histogram keeps moving: two more requests (a fresh label series appears only with its first
        # observation, so increase() over the first round would miss it; compare absolute counts instead)
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            more = [client.post("/certify", files={"image": ("t.png", png, "image/png")}),
                    client.post("/certify", files={"image": ("t.png", png, "image/png")},
                                data={"mode": "sequential", "max_samples": "500", "alpha": "0.01"})]
        assert [r.status_code for r in more] == [200, 200]
        assert _wait_for(base, "sum(certserve_request_duration_seconds_count)", lambda v: v >= 10) == 10.0
        assert _wait_for(base, 'certserve_request_duration_seconds_count{method="sequential"}', lambda v: v >= 4) == 4
        samples = _wait_for(base, "certserve_samples_processed_total", lambda v: v > 0)
        assert samples > 0

        if PROMTOOL is not None:
            text = httpx.get(srv.url + "/metrics", timeout=10).text
            check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True,
                                   timeout=60, check=False)
            assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
                f"promtool check metrics: rc={check.returncode}\n{check.stdout}\n{check.stderr}")
    finally:
        if prom is not None and prom.poll() is None:
            prom.terminate()
            try:
                prom.wait(timeout=20)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait(timeout=20)
        prom_log.close()
        srv.close()
