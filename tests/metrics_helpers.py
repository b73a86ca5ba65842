"""Shared by the metrics tests (tests/test_server_metrics.py, tests/test_server_metrics_states.py): reading a
/metrics exposition with prometheus_client's own text parser (``families``), and picking samples, single values and
histogram buckets out of a family by suffix and labels.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

EASY = 2


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, suffix: str = "", **labels) -> list:
    name = family.name + suffix
    return [s for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def value(family, suffix: str = "", **labels) -> float:
    found = samples(family, suffix, **labels)
    assert len(found) == 1, f"{family.name}{suffix}{labels}: {len(found)} samples"
    return found[0].value


def buckets(family, **labels) -> list[tuple[float, float]]:
    out = [(float(s.labels["le"]), s.value) for s in samples(family, "_bucket", **labels)]
    return sorted(out)
