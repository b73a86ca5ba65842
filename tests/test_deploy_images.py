"""The images the scale-out configs run, and their recipes: the Dockerfile (its install step under a stub pip, its
final onnxruntime check, its user), the documented ``docker build`` commands (README, the Dockerfile's header, the
RayService manifest) with the onnxruntime-gpu pin of each CUDA base, pyproject's Ray floor, and ``make bundle`` (the
documented recipe of the shipped bundle). The configs themselves (deploy/ray/serve.yaml, the RayService):
tests/test_deploy_configs.py.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.deploy_helpers import RAYSERVICE_YAML, ROOT, load, pod_templates

# --- the images (Dockerfile) and their recipes; pyproject's Ray floor; the Makefile's bundle recipe ------------------

DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"
SMOKE_TEST = ROOT / "docker" / "smoke-test.sh"
MAKEFILE = ROOT / "Makefile"
BUNDLE_MANIFEST = ROOT / "models" / "bundles" / "fmnist-sigma0.25" / "manifest.json"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1]
            continue
        word, _, rest = (buf + line).strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_args() -> dict[str, str]:
    args = {}
    for word, rest in dockerfile_instructions():
        if word == "ARG":
            name, _, default = rest.partition("=")
            args.setdefault(name, default.strip('"'))
    return args


def dockerfile_run(marker: str) -> str:
    [run] = [rest for word, rest in dockerfile_instructions() if word == "RUN" and marker in rest]
    return run


def docker_builds(path: Path) -> list[dict]:
    """The `docker build` commands of a file, in its code or its comments: {"tag": ..., "args": {NAME: value}}."""
    text = "\n".join(re.sub(r"^\s*#\s?", "", line) for line in path.read_text().splitlines())
    builds = []
    for line in text.replace("\\\n", " ").splitlines():
        m = re.search(r"docker build (.*)", line)
        if not m or "--build-arg" not in m.group(1):
            continue
        words = shlex.split(m.group(1).split("`")[0], comments=True)
        build = {"tag": None, "args": {}}
        for flag, value in itertools.pairwise(words):
            if flag == "-t":
                build["tag"] = value
            elif flag == "--build-arg":
                name, _, build["args"][name] = value.partition("=")
        builds.append(build)
    return builds


# The CUDA major version each onnxruntime-gpu release's CUDA provider links against (libcudart.so.N, read off the
# libonnxruntime_providers_cuda.so of the PyPI wheels: 1.19.2 ... 1.26.0 -> 12, 1.27.0 ... 1.31.1 -> 13).
def ort_gpu_cuda_major(minor: int) -> int:
    return 11 if minor < 19 else 12 if minor < 27 else 13


def cuda_majors_of(ort_package: str) -> set[int]:
    req = Requirement(ort_package)
    assert req.name == "onnxruntime-gpu", ort_package
    return {ort_gpu_cuda_major(m) for m in range(15, 80)
            if any(req.specifier.contains(f"1.{m}.{p}") for p in range(4))}


def test_gpu_builds_pin_an_onnxruntime_gpu_for_their_cuda_base():
    """Every documented GPU build pins onnxruntime-gpu to releases of one CUDA major version, that of its base image
    (unpinned, the base's Python picks it: 3.11+ gets a CUDA 13 build whose provider cannot load on a CUDA 12 base)."""
    builds = [b for path in (DOCKERFILE, README, RAYSERVICE_YAML) for b in docker_builds(path)
              if "onnxruntime-gpu" in b["args"].get("ORT_PACKAGE", "")]
    assert len(builds) >= 5  # GPU and Ray image in the Dockerfile's header and README, Ray image in the manifest
    for build in builds:
        majors = cuda_majors_of(build["args"]["ORT_PACKAGE"])
        base = re.match(r"nvidia/cuda:(\d+)\.", build["args"].get("BASE_IMAGE", ""))
        assert base and majors == {int(base.group(1))}, build
        assert build["args"].get("INSTALL_PYTHON") == "1", build  # the CUDA bases ship no Python
    assert cuda_majors_of("onnxruntime-gpu") == {11, 12, 13}  # what an unpinned build could get
    # the smoke test checks its GPU variant's provider against the CUDA major version of its package's pair
    smoke = SMOKE_TEST.read_text()
    package = re.search(r"ORT_GPU_PACKAGE=\$\{ORT_GPU_PACKAGE:-([^}]+)\}", smoke).group(1)
    assert cuda_majors_of(package) == {int(re.search(r"CUDA_MAJOR=\$\{CUDA_MAJOR:-(\d+)\}", smoke).group(1))}


def test_kuberay_manifest_names_the_ray_image_its_recipe_builds():
    rs = load(RAYSERVICE_YAML)
    [build] = docker_builds(RAYSERVICE_YAML)
    images = {c["image"] for t in pod_templates(rs) for c in t["spec"]["containers"]}
    assert images == {build["tag"]}
    assert "ray" in build["args"]["EXTRAS"].split(",")
    assert set(build["args"]) <= set(dockerfile_args()), "a --build-arg the Dockerfile does not declare"
    assert dockerfile_args()["RAY_VERSION"] == rs["spec"]["rayClusterConfig"]["rayVersion"]
    # README gives the same recipe
    assert build in docker_builds(README)
    # no recipe installs certserve from PyPI (it is not there), and the manifest's pip recipe swaps onnxruntime
    for path in (RAYSERVICE_YAML, README, DOCKERFILE):
        assert not re.search(r"pip install\s+['\"]?certserve\[", path.read_text()), path
    text = RAYSERVICE_YAML.read_text()
    assert "pip uninstall -y onnxruntime" in text and "pip install --no-deps 'onnxruntime-gpu==" in text
    assert re.search(r"pip install '/path/to/certserve\[ray\]' 'ray\[serve\]==" + re.escape(
        dockerfile_args()["RAY_VERSION"]) + "'", text)


def test_ray_floor_is_the_version_the_code_and_the_cluster_use():
    """ray[serve]>=2.40 admitted releases whose serve.ingress() needs an argument and which lack HAProxy ingress."""
    tomllib = pytest.importorskip("tomllib")
    import ray

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    [req] = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    assert "serve" in req.extras
    ray_version = load(RAYSERVICE_YAML)["spec"]["rayClusterConfig"]["rayVersion"]
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert floors and max(floors).release[:2] == Version(ray_version).release[:2] == (2, 60)
    assert req.specifier.contains(ray_version) and req.specifier.contains(ray.__version__)
    assert not req.specifier.contains("2.40.0") and not req.specifier.contains("3.0.0")


def test_image_user_has_a_group_entry():
    """`USER 10001:10001` needs a group with gid 10001 (useradd --user-group made a system group, gid 999)."""
    instructions = dockerfile_instructions()
    assert [rest for word, rest in instructions if word == "USER"] == ["10001:10001"]
    run = dockerfile_run("useradd")
    assert re.search(r"groupadd (--system )?--gid 10001 certserve", run)
    assert re.search(r"useradd [^;&]*--uid 10001 --gid 10001 ", run) and "--user-group" not in run


def _run_install(tmp_path: Path, ort_package: str, extras: str = "", fail: str = "") -> tuple[int, list[str]]:
    """The Dockerfile's install RUN under `sh -eu` with a stub pip that logs its arguments and fails on `fail`."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    (venv / "bin" / "pip").write_text('#!/bin/sh\necho "$*" >>"$LOG"\n'
                                      'if [ -n "$FAIL" ]; then case "$*" in *"$FAIL"*) exit 1;; esac; fi\n')
    (venv / "bin" / "pip").chmod(0o755)
    script = dockerfile_run("/opt/venv/bin/pip install").replace("python3 -m venv /opt/venv", "true")
    script = script.replace("/opt/venv", str(venv))
    env = {"PATH": os.environ["PATH"], "LOG": str(log), "FAIL": fail, "ORT_PACKAGE": ort_package, "EXTRAS": extras,
           "RAY_VERSION": dockerfile_args()["RAY_VERSION"]}
    rc = subprocess.run(["sh", "-eu", "-c", script], env=env, cwd=tmp_path, capture_output=True, check=False).returncode
    return rc, log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("ort_package, extras, fail, ok", [
    ("onnxruntime", "", "", True),
    ("onnxruntime-gpu==1.23.*", "", "", True),
    ("onnxruntime-gpu==1.23.*", "", "--no-deps onnxruntime-gpu", False),  # the GPU build's install fails
    ("onnxruntime-gpu==1.23.*", "", "uninstall -y onnxruntime", False),
    ("onnxruntime", "ray", "--no-cache-dir .", False),  # the project's install fails
    ("onnxruntime-gpu==1.23.*", "ray", "uninstall -y pip", True),  # only the removal of pip itself may fail
])
def test_install_step_fails_when_an_install_fails(tmp_path, ort_package, extras, fail, ok):
    rc, calls = _run_install(tmp_path, ort_package, extras, fail)
    assert (rc == 0) == ok, (rc, calls)
    if ok:
        assert calls[-1] == "uninstall -y pip setuptools wheel"


@pytest.mark.parametrize("extras, pinned", [("", False), ("ray", True), ("gpu,ray", True), ("gpu", False)])
def test_ray_image_pins_ray_to_the_cluster_version(tmp_path, extras, pinned):
    _, calls = _run_install(tmp_path, "onnxruntime", extras)
    pin = f"ray[serve]=={load(RAYSERVICE_YAML)['spec']['rayClusterConfig']['rayVersion']}"
    assert (pin in calls[0].split()) == pinned, calls[0]


@pytest.mark.parametrize("ort_package, ok", [("onnxruntime", True), ("onnxruntime-gpu==1.23.*", False)])
def test_build_check_refuses_an_onnxruntime_from_another_package(tmp_path, ort_package, ok):
    """The build's final check, run against this environment (CPU onnxruntime): accepted for ORT_PACKAGE=onnxruntime,
    refused when a GPU package was asked for (as when onnxruntime-gpu's install failed or the CPU one shadows it)."""
    site = Path(sysconfig.get_paths()["purelib"])
    script = dockerfile_run("packages_distributions").replace("/opt/venv/bin/python", sys.executable)
    script = script.replace("/opt/venv/lib/python3*/site-packages", str(site))
    assert "onnxruntime as ort" in script and "CUDAExecutionProvider" in script and "ldd" in script
    proc = subprocess.run(["sh", "-eu", "-c", script], env={**os.environ, "ORT_PACKAGE": ort_package}, cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    if not ok:
        assert "onnxruntime-gpu was asked for" in proc.stderr


def _calibrate_commands(text: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(m.group(1), comments=True) for m in re.finditer(r"certserve (calibrate \S+[^\n]*)", joined)]


def _options(words: list[str]) -> dict:
    opts, i = {"_": []}, 2
    while i < len(words):
        if words[i].startswith("--"):
            has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            opts[words[i]] = words[i + 1] if has_value else True
            i += 2 if has_value else 1
        else:
            opts["_"].append(words[i])
            i += 1
    return opts


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_bundle_runs_the_documented_recipe_of_the_shipped_bundle():
    """`make bundle` = README's three commands for the embedded bundle (device aside), which its manifest records."""
    out = subprocess.run(["make", "-n", "bundle"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    made = {c[1]: _options(c) for c in _calibrate_commands(out)}
    assert list(made) == ["all", "counts", "conformal"]
    bundle = "models/bundles/fmnist-sigma0.25"
    documented = {c[1]: _options(c) for c in _calibrate_commands(README.read_text())
                  if _options(c).get("--out") == bundle or (c[1] == "counts" and "--seed" in c)}
    assert set(documented) == {"all", "counts", "conformal"}
    cal_samples = made["all"].pop("--cal-samples", None)
    assert documented["all"].pop("--cal-samples", None) == cal_samples  # README's command is the build's
    for sub, opts in made.items():
        opts.pop("--device", None)
        documented[sub].pop("--device", None)
        assert opts == documented[sub], sub
    manifest = json.loads(BUNDLE_MANIFEST.read_text())["provenance"]
    assert cal_samples is None or int(cal_samples) == manifest["config"]["cal_samples"]
    recal = manifest["recalibration"]
    assert int(made["counts"]["--seed"]) == recal["counts"]["seed"]
    assert int(made["counts"]["--n"]) == recal["counts"]["num_samples"]
    assert int(made["conformal"]["--tune-size"]) == recal["tune_size"]
