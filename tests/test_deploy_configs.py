"""The scale-out configs: deploy/ray/serve.yaml (``serve run`` / ``serve deploy``) and deploy/kuberay/rayservice.yaml.

No Kubernetes cluster can run here, and no package registry ships KubeRay's RayService CRD (its OpenAPI schema lives
only in the operator's source), so the RayService is validated in three parts instead:
1. ``serveConfigV2`` against Ray's own ``ServeDeploySchema`` -- strictly: that schema ignores unknown keys, so every
   key is also checked against the fields of the schema model it lands in (a misspelled key fails);
2. every pod template against the Kubernetes core/v1 ``PodTemplateSpec`` OpenAPI schema (``kubernetes-validate``,
   strict: no unknown fields);
3. the RayService skeleton against ``RAYSERVICE_SCHEMA`` below: the fields of KubeRay's ray.io/v1 Go types
   (RayServiceSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, AutoscalerOptions) that a manifest may set, with
   their types (rayStartParams values are strings), no others.
Each check is shown to fail on a misspelled or mistyped key.
"""

from __future__ import annotations

import copy
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

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from pydantic import BaseModel
from ray.runtime_env import RuntimeEnv
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from server.ray_serve import DEPLOYMENT_NAME, build_app, ingress_environment
from server.settings import Settings


def build_from_config(app_config: dict):
    """What Serve does with a config's import_path + args (signature check, then the call)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    assert app_config["import_path"] == "server.ray_serve:build_app"
    return call_user_app_builder_with_args_if_necessary(build_app, app_config.get("args", {}))

ROOT = Path(__file__).resolve().parents[1]
SERVE_YAML = ROOT / "deploy" / "ray" / "serve.yaml"
RAYSERVICE_YAML = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
RAY_ENV_FILE = ROOT / "deploy" / "ray" / "ray.env"
INGRESS_ENV = ingress_environment("haproxy", Settings())
K8S_VERSION = "1.30.0"  # the oldest Kubernetes minor the manifest is checked against

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_OBJECT = {"type": "object"}  # a core/v1 type: checked by kubernetes-validate (pod templates) or left to the API server
RAYSERVICE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
            "namespace": {"type": "string"}, "labels": _STR_MAP, "annotations": _STR_MAP}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["serveConfigV2", "rayClusterConfig"],
                 "properties": {
                     "serveConfigV2": {"type": "string"}, "serveService": _OBJECT, "upgradeStrategy": _OBJECT,
                     "excludeHeadPodFromServeSvc": {"type": "boolean"},
                     "rayClusterConfig": {"$ref": "#/$defs/RayClusterSpec"}}},
    },
    "$defs": {
        "RayClusterSpec": {"type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
                           "properties": {
                               "suspend": {"type": "boolean"}, "managedBy": {"type": "string"},
                               "autoscalerOptions": {"$ref": "#/$defs/AutoscalerOptions"},
                               "headServiceAnnotations": _STR_MAP, "enableInTreeAutoscaling": {"type": "boolean"},
                               "gcsFaultToleranceOptions": _OBJECT,
                               "headGroupSpec": {"$ref": "#/$defs/HeadGroupSpec"}, "rayVersion": {"type": "string"},
                               "workerGroupSpecs": {"type": "array", "items": {"$ref": "#/$defs/WorkerGroupSpec"}}}},
        "AutoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
            "resources": _OBJECT, "image": {"type": "string"}, "imagePullPolicy": {"type": "string"},
            "securityContext": _OBJECT, "idleTimeoutSeconds": _INT32,
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}, "env": {"type": "array"},
            "envFrom": {"type": "array"}, "volumeMounts": {"type": "array"}}},
        "HeadGroupSpec": {"type": "object", "additionalProperties": False, "required": ["template"], "properties": {
            "template": _OBJECT, "headService": _OBJECT, "enableIngress": {"type": "boolean"},
            "rayStartParams": _STR_MAP, "serviceType": {"type": "string"}}},
        "WorkerGroupSpec": {"type": "object", "additionalProperties": False,
                            "required": ["groupName", "template", "maxReplicas"], "properties": {
                                "suspend": {"type": "boolean"}, "groupName": {"type": "string"},
                                "replicas": _INT32, "minReplicas": _INT32, "maxReplicas": _INT32,
                                "idleTimeoutSeconds": _INT32, "rayStartParams": _STR_MAP, "template": _OBJECT,
                                "scaleStrategy": _OBJECT, "numOfHosts": _INT32}},
    },
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def unknown_keys(raw: dict, model: BaseModel, path: str) -> list[str]:
    """Keys of ``raw`` that are not fields (or aliases) of the pydantic ``model`` it validated into, recursively."""
    fields = type(model).model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    problems = []
    for key, value in raw.items():
        if key not in known:
            problems.append(f"{path}.{key}")
            continue
        sub = getattr(model, key)
        if isinstance(sub, BaseModel) and isinstance(value, dict):
            problems += unknown_keys(value, sub, f"{path}.{key}")
        elif isinstance(sub, list) and isinstance(value, list):
            for i, (item, raw_item) in enumerate(zip(sub, value)):
                if isinstance(item, BaseModel) and isinstance(raw_item, dict):
                    problems += unknown_keys(raw_item, item, f"{path}.{key}[{i}]")
    return problems


def serve_config_problems(config: dict) -> list[str]:
    """Validate a Serve config like ``serve deploy`` does, then flag every key that the schema would silently drop.

    The fields typed as plain dicts are checked against their own models: autoscaling_config (AutoscalingConfig),
    runtime_env (RuntimeEnv's known fields) and the application's args (certserve's build_app).
    """
    model = ServeDeploySchema.model_validate(config)
    problems = unknown_keys(config, model, "config")
    for i, app in enumerate(config.get("applications", [])):
        where = f"config.applications[{i}]"
        problems += [f"{where}.runtime_env.{k}" for k in app.get("runtime_env", {}) if k not in RuntimeEnv.known_fields]
        try:
            build_from_config(app)
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}.args: {exc}")
        for j, dep in enumerate(app.get("deployments", [])):
            auto = dep.get("autoscaling_config")
            if isinstance(auto, dict):
                problems += unknown_keys(auto, AutoscalingConfig.model_validate(auto),
                                         f"{where}.deployments[{j}].autoscaling_config")
    return problems


def serve_config_of(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def pod_templates(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]


def rayservice_problems(rayservice: dict) -> list[str]:
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in jsonschema.Draft202012Validator(RAYSERVICE_SCHEMA).iter_errors(rayservice)]
    if problems:
        return problems
    problems += serve_config_problems(serve_config_of(rayservice))
    for i, template in enumerate(pod_templates(rayservice)):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"template-{i}"},
                   "template": template}
        try:
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"pod template {i}: {exc.message}")
    return problems


# --- deploy/ray/serve.yaml -----------------------------------------------------------------------------------------

def test_serve_yaml_is_a_valid_serve_config_with_no_unknown_key():
    assert serve_config_problems(load(SERVE_YAML)) == []


def test_serve_yaml_matches_what_serve_build_writes_for_the_import_path():
    """The same steps as ``serve build`` (ray/serve/scripts.py): import the application, build it, dump its
    deployments. The YAML must name the deployments the code defines (an override for a deployment that does not
    exist fails ``serve deploy``) and set only keys of the schema that ``serve build`` writes them in."""
    from ray.serve._private.build_app import build_app as ray_build_app
    from ray.serve.schema import ServeApplicationSchema

    config = load(SERVE_YAML)
    app = config["applications"][0]
    built = ray_build_app(build_from_config(app), name=app["name"])
    assert [d.name for d in built.deployments] == [DEPLOYMENT_NAME]
    assert [d["name"] for d in app["deployments"]] == [DEPLOYMENT_NAME]
    # the code's defaults are valid deployment options too (what `certserve serve --replicas N` runs with)
    assert built.deployments[0]._deployment_config.max_ongoing_requests > 5
    ServeApplicationSchema.model_validate({"import_path": app["import_path"], "deployments": app["deployments"]})


def test_serve_yaml_sizes_replicas_for_batching():
    """Ray's defaults (5 ongoing requests, target 2) would starve the engine: the config must raise both."""
    dep = load(SERVE_YAML)["applications"][0]["deployments"][0]
    assert dep["max_ongoing_requests"] >= 64
    assert 32 <= dep["autoscaling_config"]["target_ongoing_requests"] <= dep["max_ongoing_requests"]
    # Serve's 30 s deregistration window + the server's default 30 s deadline: requests admitted then end on their own
    assert dep["graceful_shutdown_timeout_s"] >= 60


@pytest.mark.parametrize("path, bad_key", [
    (("applications", 0), "deploymentz"),
    (("applications", 0, "deployments", 0), "max_ongoing_request"),
    (("applications", 0, "deployments", 0, "autoscaling_config"), "target_ongoing_request"),
    (("applications", 0, "deployments", 0, "ray_actor_options"), "num_gpu"),
    (("applications", 0, "runtime_env"), "env_var"),
    (("applications", 0, "args"), "devcie"),
    ((), "aplications"),
])
def test_a_misspelled_key_is_caught(path, bad_key):
    """Guards the strict check: each of these was accepted silently by ServeDeploySchema alone (checked: the first
    assertion below), and each is reported by serve_config_problems."""
    config = load(SERVE_YAML)
    node = config
    for step in path:
        node = node[step]
    node[bad_key] = 1 if bad_key != "devcie" else "cpu"
    if bad_key != "devcie":
        ServeDeploySchema.model_validate(config)  # Ray's schema alone accepts it
    problems = serve_config_problems(config)
    assert any(bad_key in p for p in problems), problems


# --- deploy/kuberay/rayservice.yaml --------------------------------------------------------------------------------

def test_rayservice_is_valid():
    assert rayservice_problems(load(RAYSERVICE_YAML)) == []


def test_rayservice_runs_the_same_applications_as_serve_yaml():
    assert serve_config_of(load(RAYSERVICE_YAML))["applications"] == load(SERVE_YAML)["applications"]


def test_rayservice_gives_each_replica_a_gpu_and_time_to_drain():
    rs = load(RAYSERVICE_YAML)
    dep = serve_config_of(rs)["applications"][0]["deployments"][0]
    workers = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus_per_pod = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
                    for g in workers for c in g["template"]["spec"]["containers"]]
    assert dep["ray_actor_options"]["num_gpus"] == 1 and all(n >= 1 for n in gpus_per_pod)
    for template in pod_templates(rs):
        assert template["spec"]["terminationGracePeriodSeconds"] > dep["graceful_shutdown_timeout_s"]
        env = {e["name"]: e.get("value") for c in template["spec"]["containers"] for e in c.get("env", [])}
        assert {k: env.get(k) for k in INGRESS_ENV} == INGRESS_ENV


def test_ray_env_file_is_the_default_ingress_environment():
    """deploy/ray/ray.env (sourced before `ray start` / `serve run`) carries exactly the variables that
    `certserve serve --replicas` sets for its default ingress; the RayService's pods carry them too (above)."""
    values = {}
    for line in RAY_ENV_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key] = shlex.split(value)[0]
    assert values == INGRESS_ENV
    assert int(values["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"]) >= 128 * 1024  # a whole image request fits: replayable


def _mutate(rs: dict, edit) -> dict:
    rs = copy.deepcopy(rs)
    edit(rs)
    return rs


@pytest.mark.parametrize("name, edit", [
    ("misspelled spec field", lambda rs: rs["spec"].update(workerGroupSpec=[])),
    ("rayStartParams value not a string",
     lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0})),
    ("unknown container field", lambda rs: rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
     ["containers"][0].update(resource={})),
    ("misspelled serveConfigV2 key", lambda rs: rs["spec"].update(
        serveConfigV2=rs["spec"]["serveConfigV2"].replace("max_ongoing_requests", "max_ongoing_request"))),
    ("wrong kind", lambda rs: rs.update(kind="RayServices")),
])
def test_rayservice_checks_catch_mistakes(name, edit):
    """Guards each of the three checks: each mutation of the valid manifest must be reported."""
    assert rayservice_problems(_mutate(load(RAYSERVICE_YAML), edit)), name


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
