"""Review of this session's late changes, second pass (rev7b).

- A Kubernetes Service named ``certserve`` sets ``CERTSERVE_PORT=tcp://IP:PORT``; Settings refuses it with a message
  that names the fixes, one being ``--port`` (the flag wins over the variable). It did for one process, but
  ``certserve serve --replicas N --port P`` built its replica settings (``settings_from_args``, host and port left out:
  the proxy's) from the environment again, so the command failed on the variable its --port had overridden, and each
  Ray replica (which never listens) would fail the same way.
- The docs-truth checks of README's Ray paragraphs depended on where the text wraps (a re-wrapped paragraph or
  serve.yaml comment failed them), and the latency paragraph's added-latency figures, which the test says it keeps,
  were not compared at all.

Fast: Ray and Serve are stand-ins here; no cluster starts.
"""

from __future__ import annotations

import os
import textwrap

import pytest

pytest.importorskip("ray.serve")

from server import ray_serve  # noqa: E402

SERVICE_LINK = "tcp://10.96.0.7:8000"  # what a Service named certserve sets in every pod of its namespace


class _Started(Exception):
    """serve.run reached: the command got past its settings."""


def test_replica_settings_do_not_read_the_port_of_a_service_link(monkeypatch):
    """A replica's settings take host and port from nowhere (the proxy listens): a service link's CERTSERVE_PORT made
    every replica's Settings fail (2026-12-06; failed before: ValidationError 'is a Kubernetes service link')."""
    monkeypatch.setenv("CERTSERVE_PORT", SERVICE_LINK)
    monkeypatch.setenv("CERTSERVE_HOST", "10.0.0.9")
    settings = ray_serve.settings_from_args({"device": "cpu", "threads": 1})
    assert settings.device == "cpu" and settings.threads == 1
    with pytest.raises(ValueError, match="host/port belong to http_options"):
        ray_serve.settings_from_args({"port": 8001})  # still refused as an arg


def test_serve_replicas_with_port_flag_starts_beside_a_service_link(monkeypatch, restore_signals):
    """``certserve serve --replicas 2 --port 8123`` with CERTSERVE_PORT=tcp://... in the environment: --port wins, as
    it does for one process, and the proxy listens on 8123 (failed before: 'certserve: error: invalid settings: port
    (CERTSERVE_PORT): is a Kubernetes service link ...', exit 2, from the replicas' settings)."""
    import ray
    from ray import serve

    from cli.main import main

    monkeypatch.setattr(os, "environ", {**os.environ, "CERTSERVE_PORT": SERVICE_LINK})  # run_local's setdefaults
    calls: list = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append("ray.init"))
    monkeypatch.setattr(ray, "is_initialized", lambda: "ray.init" in calls and "ray.shutdown" not in calls)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(serve, "start", lambda **kw: calls.append(("serve.start", kw["http_options"])))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))
    monkeypatch.setattr(ray_serve, "build_deployment", lambda args, **kw: calls.append(("build", args)) or object())

    def run(*a, **kw):
        raise _Started

    monkeypatch.setattr(serve, "run", run)
    with pytest.raises(_Started):
        main(["serve", "--replicas", "2", "--port", "8123", "--device", "cpu"])
    assert ("serve.start", {"host": "127.0.0.1", "port": 8123}) in calls, calls
    assert calls[-2:] == ["serve.shutdown", "ray.shutdown"], calls


# --- the docs-truth checks of README's Ray paragraphs -------------------------------------------------------------

def _rewrapped(text: str, starts_with: str, width: int) -> str:
    """``text`` with the paragraph that starts with ``starts_with`` re-wrapped at ``width`` (same words)."""
    from tests import test_docs_truth_review2 as docs

    old = docs._paragraph(text, starts_with)
    return text.replace(old, textwrap.fill(" ".join(old.split()), width=width, break_long_words=False,
                                           break_on_hyphens=False))


def _docs_at(monkeypatch, tmp_path, readme: str, serve_yaml: str):
    from tests import test_docs_truth_review2 as docs

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/benchmarks.md").write_text((docs.ROOT / "docs/benchmarks.md").read_text())
    (tmp_path / "deploy/ray").mkdir(parents=True)
    (tmp_path / "deploy/ray/serve.yaml").write_text(serve_yaml)
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    monkeypatch.setattr(docs, "README", readme)
    return docs


@pytest.mark.parametrize("width", [20, 44, 200])
def test_the_ray_figure_checks_do_not_depend_on_line_wrapping(monkeypatch, tmp_path, width):
    """README's cost and latency paragraphs and serve.yaml's comment, re-wrapped (the same words): the checks keep
    passing (failed before at each width: the figures were matched with the line breaks of the day's text, e.g.
    '679 and\\n#   713 MiB' in serve.yaml)."""
    from tests import test_docs_truth_review2 as docs

    readme = docs.README
    for start in ("What a replica costs", "**What Ray costs in latency**"):
        readme = _rewrapped(readme, start, width)
    yaml_text = (docs.ROOT / "deploy/ray/serve.yaml").read_text()
    comment = next(line for line in yaml_text.splitlines() if "docs/benchmarks.md section (h)" in line)
    rest = yaml_text.split(comment + "\n", 1)[1]
    follow = rest.splitlines()[0]  # the comment's next line: joined to it, then re-wrapped
    joined = " ".join((comment.lstrip("# ") + " " + follow.lstrip("# ")).split())
    wrapped = "\n".join("# " + line for line in textwrap.wrap(joined, width=max(width, 40)))
    yaml_text = yaml_text.replace(comment + "\n" + follow, wrapped)
    _docs_at(monkeypatch, tmp_path, readme, yaml_text).test_readme_ray_cost_and_latency_figures_are_benchmarks_section_h()


def test_the_ray_latency_figures_are_checked(monkeypatch, tmp_path):
    """The test says README's latency paragraph quotes (h)'s added latency: a stale figure there must fail it (passed
    before: only the date, the commit and the memory of that paragraph were compared)."""
    from tests import test_docs_truth_review2 as docs

    assert "p99 +4.5 ms" in docs.README  # (h)'s haproxy figure today; a stale one below
    stale = [docs.README.replace("p99 +4.5 ms", "p99 +4.4 ms"), docs.README.replace("+70.3 ms", "+34.7 ms"),
             docs.README.replace("1.10× with HAProxy", "1.01× with HAProxy")]
    for i, readme in enumerate(stale):
        (tmp_path / str(i)).mkdir()
        module = _docs_at(monkeypatch, tmp_path / str(i), readme, (docs.ROOT / "deploy/ray/serve.yaml").read_text())
        with pytest.raises(AssertionError):
            module.test_readme_ray_cost_and_latency_figures_are_benchmarks_section_h()
