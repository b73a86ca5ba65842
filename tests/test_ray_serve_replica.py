"""The Ray Serve replica's own checks, on a real service and without a cluster: Serve's health probe of a replica
(CertserveDeployment.check_health) follows the engine, and each replica appends to its own audit log. The real local
Ray cluster (``certserve serve --replicas 2``): tests/test_ray_serve.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server.app import build_service
from server.ray_serve import CertserveDeployment, replica_settings
from server.settings import Settings


def test_check_health_follows_the_engine():
    """Serve's health probe of a replica (CertserveDeployment.check_health) on a real service: passes while the
    engine runs, raises once it stopped (Serve then replaces the replica)."""
    service = build_service(Settings(threads=1))
    service.start()
    replica = SimpleNamespace(_service=service, _replica="test")
    check = CertserveDeployment.func_or_class.check_health
    check(replica)
    service.stop(0.0)
    with pytest.raises(RuntimeError, match="engine is not running"):
        check(replica)


def test_each_replica_appends_to_its_own_audit_log():
    """One process writes one audit log (rotation and torn-tail repair assume it): replicas get sibling files."""
    settings = replica_settings(Settings(audit_log="/var/log/certserve/audit.jsonl"), "ab12cd34")
    assert settings.audit_log == "/var/log/certserve/audit.replica-ab12cd34.jsonl"
    assert replica_settings(Settings(), "ab12cd34").audit_log is None
