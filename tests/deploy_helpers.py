"""Shared by the deployment tests (tests/test_deploy_configs.py, tests/test_deploy_images.py): the repository root,
the RayService manifest and reading it."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RAYSERVICE_YAML = ROOT / "deploy" / "kuberay" / "rayservice.yaml"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def pod_templates(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
