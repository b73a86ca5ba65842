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

The images these configs run (the Dockerfile and its documented build recipes): tests/test_deploy_images.py.
"""

from __future__ import annotations

import copy
import shlex

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel
from ray.runtime_env import RuntimeEnv
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from server.ray_serve import DEPLOYMENT_NAME, build_app, ingress_environment
from server.settings import Settings
from tests.deploy_helpers import RAYSERVICE_YAML, ROOT, load, pod_templates


def build_from_config(app_config: dict):
    """What Serve does with a config's import_path + args (signature check, then the call)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    assert app_config["import_path"] == "server.ray_serve:build_app"
    return call_user_app_builder_with_args_if_necessary(build_app, app_config.get("args", {}))


SERVE_YAML = ROOT / "deploy" / "ray" / "serve.yaml"
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
