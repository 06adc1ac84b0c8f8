"""Every PromQL expression the deploy artifacts contain, as (where, expression) pairs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy_support.tools import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "pgreact.json"
RULES = ROOT / "deploy" / "prometheus" / "pgreact.rules.yml"
SCALED_OBJECT = ROOT / "k8s" / "overlays" / "prod" / "scaledobject.yaml"
# What a scrape's samples are called, by the family type prometheus_client reports.
_SAMPLE_SUFFIX = {"counter": "_total", "histogram": "_bucket"}

_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


@dataclass(frozen=True)
class Query:
    where: str
    expr: str


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries(dashboard: Mapping[str, Any] | None = None) -> list[Query]:
    board = load_dashboard() if dashboard is None else dashboard
    return [
        Query(f"panel {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in iter_panels(board["panels"])
        for target in panel.get("targets", [])
    ]


def dashboard_variables(dashboard: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    board = load_dashboard() if dashboard is None else dashboard
    return {v["name"]: v for v in board["templating"]["list"]}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana variables (``$name``, ``${name}``) with test values; unknown ones fail."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no test value for dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(one, expr)


def load_rules(path: Path = RULES) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def alert_rules(rules: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    data = load_rules() if rules is None else rules
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


def rule_queries(rules: Mapping[str, Any] | None = None) -> list[Query]:
    data = load_rules() if rules is None else rules
    return [
        Query(f"rule {rule.get('alert') or rule.get('record')!r}", rule["expr"])
        for group in data["groups"]
        for rule in group["rules"]
    ]


def keda_queries(path: Path = SCALED_OBJECT) -> list[Query]:
    scaled = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        Query(f"ScaledObject trigger {i}", trigger["metadata"]["query"])
        for i, trigger in enumerate(scaled["spec"]["triggers"])
        if trigger["type"] == "prometheus"
    ]


def exported_metrics() -> dict[str, str]:
    """Every ``pgreact_*`` metric :mod:`pgreact.metrics` declares, as the series name queries
    use (counters with ``_total``, histograms by their ``_bucket`` series), mapped to its type.
    The standard process and platform collectors are left out."""
    from pgreact.metrics import Metrics

    metrics = Metrics()
    metrics.observe_pool(lambda: None)  # the pool's collector is registered by the daemon
    return {
        family.name + _SAMPLE_SUFFIX.get(family.type, ""): family.type
        for family in metrics.registry.collect()
        if family.name.startswith("pgreact_")
    }
