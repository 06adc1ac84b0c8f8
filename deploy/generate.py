#!/usr/bin/env python3
"""Generates the deploy artifacts that are derived from code or from one another:

- ``deploy/grafana/pgreact.json`` — the Grafana dashboard, from the panel list below;
- ``k8s/base/prometheusrule.yaml`` — the PrometheusRule, embedding
  ``deploy/prometheus/pgreact.rules.yml`` (the alerts' one source of truth) verbatim.

    python deploy/generate.py           # rewrite both files
    python deploy/generate.py --check   # exit 1 if a committed file differs from its source

Standard library only. ``tests/test_deploy.py`` fails while a committed file is stale, and
``tests/test_metrics_e2e.py`` runs every panel query against a real Prometheus.

Aggregation rules the panels follow: the database-wide gauges (``pgreact_events_pending``,
``pgreact_events_waiting_retry``, ``pgreact_oldest_pending_age_seconds``, ``pgreact_events_dead``,
``pgreact_capture_broken``, ``pgreact_notify_queue_usage``) are reported identically by every
replica, so they are combined with ``max``; counters and per-process gauges with ``sum``. Panels
link the runbooks of the alerts they help with; ``tests/test_deploy.py`` checks that every metric
of ``pgreact.metrics`` is on a panel and every alert's runbook is linked from one.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_PATH = ROOT / "deploy" / "grafana" / "pgreact.json"
RULES_PATH = ROOT / "deploy" / "prometheus" / "pgreact.rules.yml"
PROMETHEUS_RULE_PATH = ROOT / "k8s" / "base" / "prometheusrule.yaml"

# Grafana 11 dashboards; Grafana migrates older or newer models on load.
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every panel query is filtered by the dashboard's variables.
SEL = 'namespace="$namespace", pod=~"$pod"'
RUNBOOKS = "https://github.com/pgreact/pgreact/blob/main/docs/runbooks.md"
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.95, 0.99)

Json = dict[str, Any]


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    width: int = 12
    height: int = 8
    min: float | None = 0
    max: float | None = None
    stepped: bool = False
    thresholds: tuple[tuple[float, str], ...] = ()
    # Alerts whose runbooks this panel helps with: linked from the panel's header.
    runbooks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def quantiles(metric: str, by: str = "") -> tuple[Target, ...]:
    """p50/p95/p99 of a histogram across all selected replicas (``by`` adds grouping)."""
    group = f"{by}, le" if by else "le"
    return tuple(
        Target(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
            f"p{round(q * 100)}" + (f" {{{{{by}}}}}" if by else ""),
        )
        for q in QUANTILES
    )


ROWS: tuple[Row, ...] = (
    Row(
        "Overview",
        (
            Panel(
                "Replicas",
                "pgreact processes scraped in the selection.",
                (Target(f"count(pgreact_build_info{{{SEL}}})", "replicas"),),
                kind="stat",
                width=4,
                height=4,
                runbooks=("PgreactNoReadyReplicas", "PgreactTargetDown", "PgreactMetricsAbsent"),
            ),
            Panel(
                "Listeners connected",
                "Replicas whose LISTEN connection is up (each should be).",
                (Target(f"sum(pgreact_listener_connected{{{SEL}}})", "connected"),),
                kind="stat",
                width=4,
                height=4,
                runbooks=("PgreactListenerDisconnected",),
            ),
            Panel(
                "Events handled /s",
                "Events handled successfully per second, all handlers and replicas.",
                (
                    Target(
                        f'sum(rate(pgreact_events_handled_total{{{SEL}, outcome="ok"}}[{RATE}]))',
                        "ok/s",
                    ),
                ),
                unit="ops",
                kind="stat",
                width=4,
                height=4,
            ),
            Panel(
                "Pending events",
                "Live events of all handlers (database-wide: max across replicas, then summed "
                "over handlers).",
                (Target(f"sum(max by (handler) (pgreact_events_pending{{{SEL}}}))", "pending"),),
                kind="stat",
                width=4,
                height=4,
                runbooks=("PgreactBacklogGrowing",),
            ),
            Panel(
                "Dead letters",
                "Dead-lettered events of all handlers; inspect with `pgreact dead list`.",
                (Target(f"sum(max by (handler) (pgreact_events_dead{{{SEL}}}))", "dead"),),
                kind="stat",
                width=4,
                height=4,
                thresholds=((1, "red"),),
                runbooks=("PgreactDeadLetters",),
            ),
            Panel(
                "Version",
                "Running versions, listener and write drivers.",
                (
                    Target(
                        f"count by (version, listener, driver) (pgreact_build_info{{{SEL}}})",
                        "{{version}} {{listener}}/{{driver}}",
                    ),
                ),
                kind="stat",
                width=4,
                height=4,
            ),
        ),
    ),
    Row(
        "Throughput",
        (
            Panel(
                "Events handled /s by handler and outcome",
                "ok: done; retry: the attempt failed and a retry is scheduled; dead: the last "
                "attempt failed and the event was dead-lettered.",
                (
                    Target(
                        "sum by (handler, outcome) "
                        f"(rate(pgreact_events_handled_total{{{SEL}}}[{RATE}]))",
                        "{{handler}} {{outcome}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Notifications received /s by channel",
                "NOTIFY messages received on the LISTEN connections (wake-ups and on_notify "
                "channels).",
                (
                    Target(
                        "sum by (channel) "
                        f"(rate(pgreact_notifications_received_total{{{SEL}}}[{RATE}]))",
                        "{{channel}}",
                    ),
                ),
                unit="ops",
            ),
        ),
    ),
    Row(
        "Latency",
        (
            Panel(
                "Event lag (capture → commit)",
                "From the change's capture to the commit that marked it done, including "
                "queueing and retries.",
                quantiles("pgreact_event_lag_seconds"),
                unit="s",
            ),
            Panel(
                "Handler duration",
                "Duration of one handler call.",
                quantiles("pgreact_handler_duration_seconds"),
                unit="s",
            ),
            Panel(
                "Event lag by handler",
                "Lag quantiles per handler.",
                quantiles("pgreact_event_lag_seconds", by="handler"),
                unit="s",
            ),
            Panel(
                "Handler duration by handler",
                "Call duration quantiles per handler.",
                quantiles("pgreact_handler_duration_seconds", by="handler"),
                unit="s",
            ),
        ),
    ),
    Row(
        "Backlog",
        (
            Panel(
                "Pending events by handler",
                "Live events (including those waiting for a retry), database-wide.",
                (
                    Target(
                        f"max by (handler) (pgreact_events_pending{{{SEL}}})",
                        "{{handler}}",
                    ),
                ),
                runbooks=("PgreactBacklogGrowing",),
            ),
            Panel(
                "Waiting for retry by handler",
                "Live events in retry back-off (their next attempt is not due yet), "
                "database-wide. No added replica can run them sooner.",
                (
                    Target(
                        f"max by (handler) (pgreact_events_waiting_retry{{{SEL}}})",
                        "{{handler}}",
                    ),
                ),
                runbooks=("PgreactHandlerFailureRatioHigh",),
            ),
            Panel(
                "Runnable now (what KEDA scales on)",
                "Pending minus waiting for retry, summed over handlers: the ScaledObject's "
                "query, one replica per 500.",
                (
                    Target(
                        f"sum(max by (handler) (pgreact_events_pending{{{SEL}}}) - "
                        f"max by (handler) (pgreact_events_waiting_retry{{{SEL}}}))",
                        "runnable",
                    ),
                ),
                runbooks=("PgreactBacklogGrowing",),
            ),
            Panel(
                "Oldest pending event age by handler",
                "Age of the oldest live event per handler, database-wide.",
                (
                    Target(
                        f"max by (handler) (pgreact_oldest_pending_age_seconds{{{SEL}}})",
                        "{{handler}}",
                    ),
                ),
                unit="s",
                thresholds=((600, "orange"),),
                runbooks=("PgreactOldestPendingTooOld",),
            ),
            Panel(
                "Capture broken by handler",
                "1 while a handler's table is gone, renamed or lacks pgreact's capture triggers: "
                "its changes are not recorded (`pgreact check` says what to do).",
                (Target(f"max by (handler) (pgreact_capture_broken{{{SEL}}})", "{{handler}}"),),
                width=24,
                min=0,
                max=1,
                stepped=True,
                thresholds=((1, "red"),),
                runbooks=("PgreactCaptureBroken",),
            ),
        ),
    ),
    Row(
        "Dead letters",
        (
            Panel(
                "Dead-lettered events by handler",
                "Events that failed PGREACT_MAX_ATTEMPTS times; `pgreact dead list|retry|purge`.",
                (Target(f"max by (handler) (pgreact_events_dead{{{SEL}}})", "{{handler}}"),),
                thresholds=((1, "red"),),
                runbooks=("PgreactDeadLetters",),
            ),
            Panel(
                "Failed attempts /s by handler",
                "Attempts that raised or timed out: retry scheduled or dead-lettered.",
                (
                    Target(
                        "sum by (handler, outcome) (rate(pgreact_events_handled_total"
                        f'{{{SEL}, outcome=~"retry|dead"}}[{RATE}]))',
                        "{{handler}} {{outcome}}",
                    ),
                ),
                unit="ops",
                runbooks=("PgreactHandlerFailureRatioHigh",),
            ),
        ),
    ),
    Row(
        "Recovery",
        (
            Panel(
                "Transient database errors /s by handler",
                "Lost connections, serialization failures and deadlocks, retried without "
                "spending an attempt.",
                (
                    Target(
                        f"sum by (handler) (rate(pgreact_transient_errors_total{{{SEL}}}[{RATE}]))",
                        "{{handler}}",
                    ),
                ),
                unit="ops",
                runbooks=("PgreactTransientErrors",),
            ),
            Panel(
                "Lease conflicts /s by handler",
                "Transactions rolled back because another process had taken their events over "
                "(after a stall longer than the lease).",
                (
                    Target(
                        f"sum by (handler) (rate(pgreact_lease_conflicts_total{{{SEL}}}[{RATE}]))",
                        "{{handler}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Claims reaped by handler",
                "Claims taken back from processes that died holding them: repeated reaping is "
                "a crash loop.",
                (
                    Target(
                        "sum by (handler) "
                        f"(increase(pgreact_claims_reaped_total{{{SEL}}}[{RATE}]))",
                        "{{handler}}",
                    ),
                ),
                runbooks=("PgreactClaimsReaped",),
            ),
            Panel(
                "Container restarts by pod",
                "Restarts of the pgreact container (kube-state-metrics): crashes, OOM kills, "
                "failed liveness probes.",
                (
                    Target(
                        "sum by (pod) (increase(kube_pod_container_status_restarts_total"
                        f'{{{SEL}, container="pgreact"}}[{RATE}]))',
                        "{{pod}}",
                    ),
                ),
                runbooks=("PgreactClaimsReaped", "PgreactNoReadyReplicas"),
            ),
        ),
    ),
    Row(
        "Listener",
        (
            Panel(
                "Listener connected by pod",
                "1 while the pod's dedicated LISTEN connection is up; a pod without it is not "
                "ready.",
                (Target(f"max by (pod) (pgreact_listener_connected{{{SEL}}})", "{{pod}}"),),
                width=8,
                min=0,
                max=1,
                stepped=True,
                runbooks=("PgreactListenerDisconnected",),
            ),
            Panel(
                "Listener reconnects by pod",
                "Times the LISTEN connection was re-established.",
                (
                    Target(
                        "sum by (pod) "
                        f"(increase(pgreact_listener_reconnects_total{{{SEL}}}[{RATE}]))",
                        "{{pod}}",
                    ),
                ),
                width=8,
                runbooks=("PgreactListenerDisconnected",),
            ),
            Panel(
                "Notifications dropped by channel",
                "on_notify notifications dropped because the handler's queue was full (they are "
                "gone: at most once).",
                (
                    Target(
                        "sum by (channel) "
                        f"(increase(pgreact_notifications_dropped_total{{{SEL}}}[{RATE}]))",
                        "{{channel}}",
                    ),
                ),
                width=8,
                runbooks=("PgreactNotificationsDropped",),
            ),
        ),
    ),
    Row(
        "Database pool",
        (
            Panel(
                "Pool connections by state (all replicas)",
                "Write-pool connections summed over replicas: compare with the connection budget "
                "(replicas * (PGREACT_POOL_SIZE + PGREACT_MAX_OVERFLOW)).",
                (
                    Target(
                        f"sum by (state) (pgreact_db_pool_connections{{{SEL}}})",
                        "{{state}}",
                    ),
                ),
                runbooks=("PgreactPoolSaturated",),
            ),
            Panel(
                "Idle connections by pod",
                "Idle write-pool connections per pod; none for minutes means the pool limits "
                "throughput (handler transactions in flight are at most PGREACT_POOL_SIZE - 1).",
                (
                    Target(
                        f'sum by (pod) (pgreact_db_pool_connections{{{SEL}, state="idle"}})',
                        "{{pod}}",
                    ),
                ),
                runbooks=("PgreactPoolSaturated",),
            ),
        ),
    ),
    Row(
        "Process",
        (
            Panel(
                "CPU by pod",
                "CPU seconds per second of each pgreact process (1 = one core).",
                (
                    Target(
                        f"sum by (pod) (rate(process_cpu_seconds_total{{{SEL}}}[{RATE}]))",
                        "{{pod}}",
                    ),
                ),
            ),
            Panel(
                "Resident memory by pod",
                "Resident memory of each pgreact process; compare with the container's limit.",
                (Target(f"sum by (pod) (process_resident_memory_bytes{{{SEL}}})", "{{pod}}"),),
                unit="bytes",
            ),
        ),
    ),
    Row(
        "NOTIFY queue",
        (
            Panel(
                "NOTIFY queue usage",
                "pg_notification_queue_usage() of the server (max across replicas). At 100 % "
                "every transaction that sends NOTIFY fails at commit.",
                (Target(f"max(pgreact_notify_queue_usage{{{SEL}}})", "usage"),),
                unit="percentunit",
                width=24,
                max=1,
                thresholds=((0.5, "orange"), (0.8, "red")),
                runbooks=("PgreactNotifyQueueUsageHigh",),
            ),
        ),
    ),
)


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> Json:
    steps: list[Json] = [{"color": "green", "value": None}]
    steps += [{"color": color, "value": value} for value, color in panel.thresholds]
    defaults: Json = {
        "unit": panel.unit,
        "thresholds": {"mode": "absolute", "steps": steps},
        "color": {"mode": "palette-classic" if panel.kind == "timeseries" else "thresholds"},
    }
    if panel.min is not None:
        defaults["min"] = panel.min
    if panel.max is not None:
        defaults["max"] = panel.max
    options: Json
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineInterpolation": "stepAfter" if panel.stepped else "linear",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": False,
            "thresholdsStyle": {"mode": "line" if panel.thresholds else "off"},
        }
        options = {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
                "calcs": ["mean", "max", "lastNotNull"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
        }
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "links": [
            {
                "title": f"Runbook: {alert}",
                "url": f"{RUNBOOKS}#{alert.lower()}",
                "targetBlank": True,
            }
            for alert in panel.runbooks
        ],
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "editorMode": "code",
                "expr": t.expr,
                "legendFormat": t.legend,
                "range": True,
                "instant": False,
            }
            for i, t in enumerate(panel.targets)
        ],
    }


def _variables() -> list[Json]:
    def query_var(name: str, label: str, query: str, *, all_pods: bool) -> Json:
        var: Json = {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "definition": query,
            "query": {"query": query, "refId": f"{name}-variable", "qryType": 1},
            "refresh": 2,  # on time range change: pods come and go
            "sort": 1,
            "hide": 0,
            "regex": "",
            "current": {},
            "options": [],
            "includeAll": all_pods,
            "multi": all_pods,
        }
        if all_pods:
            var["allValue"] = ".*"
        return var

    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "refresh": 1,
            "hide": 0,
            "regex": "",
            "current": {},
            "options": [],
            "includeAll": False,
            "multi": False,
        },
        query_var(
            "namespace",
            "Namespace",
            "label_values(pgreact_build_info, namespace)",
            all_pods=False,
        ),
        query_var(
            "pod",
            "Pod",
            'label_values(pgreact_build_info{namespace="$namespace"}, pod)',
            all_pods=True,
        ),
    ]


def dashboard() -> Json:
    panels: list[Json] = []
    next_id = 1
    y = 0
    for row in ROWS:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        x = 0
        row_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x = 0
                y += row_height
                row_height = 0
            panels.append(_panel_json(panel, next_id, x, y))
            next_id += 1
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    return {
        "uid": "pgreact",
        "title": "pgreact",
        "description": "pgreact: throughput, latency, backlog, dead letters, recovery, listener, "
        "pool and NOTIFY queue. Generated by deploy/generate.py; edit that, not this file.",
        "tags": ["pgreact", "postgresql"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "liveNow": False,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "weekStart": "",
        "links": [
            {
                "title": "Runbooks",
                "type": "link",
                "url": RUNBOOKS,
                "icon": "doc",
                "targetBlank": True,
                "tooltip": "One section per pgreact alert",
            }
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": _variables()},
        "panels": panels,
    }


def render_dashboard() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


PROMETHEUS_RULE_HEADER = """\
# GENERATED by deploy/generate.py from deploy/prometheus/pgreact.rules.yml: do not edit here.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: pgreact
  labels:
    app.kubernetes.io/name: pgreact
    app.kubernetes.io/component: alerting
spec:
"""


def render_prometheus_rule(rules_text: str | None = None) -> str:
    """The rules file's text, comments included, indented under ``spec:``."""
    text = RULES_PATH.read_text(encoding="utf-8") if rules_text is None else rules_text
    body = "".join(
        ("  " + line if line.strip() else "\n") for line in text.splitlines(keepends=True)
    )
    return PROMETHEUS_RULE_HEADER + body


def outputs() -> dict[Path, str]:
    return {DASHBOARD_PATH: render_dashboard(), PROMETHEUS_RULE_PATH: render_prometheus_rule()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    stale = []
    for path, content in outputs().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == content:
            continue
        if args.check:
            stale.append(path.relative_to(ROOT))
        else:
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(
            "stale: " + ", ".join(map(str, stale)) + " (run python deploy/generate.py)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
