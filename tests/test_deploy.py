"""The deploy artifacts, each checked by the tool of its ecosystem.

- ``Dockerfile``: hadolint (no warnings), its structure with dockerfile-parse, and the entry
  command's SIGTERM handling as PID 1 of a fresh PID namespace (what a container gives it).
- ``k8s/``: every overlay rendered with ``kubectl kustomize``, validated with
  ``kubernetes-validate --strict``; the custom resources against their CRD schemas (vendored in
  ``tests/deploy_support/schemas``); the settings checked by pgreact's own settings loader;
  yamllint over every YAML file.
- ``deploy/prometheus``: ``promtool check rules`` and ``promtool test rules``; the PrometheusRule
  embeds exactly the same rules; runbooks exist for every alert.
- ``deploy/grafana``: regenerating the dashboard yields the committed JSON; its structure.

A missing tool skips locally and fails under ``CI=true``.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from pgreact.settings import load_settings
from tests.deploy_support.queries import (
    alert_rules,
    dashboard_queries,
    dashboard_variables,
    iter_panels,
    load_dashboard,
    load_rules,
)
from tests.deploy_support.tools import ROOT, VENV_BIN, missing, require_tool, run_tool
from tests.support import create_tables, libpq

OVERLAYS = ("dev", "prod")
CRD_KINDS = ("PodMonitor", "PrometheusRule", "ScaledObject")
SCHEMAS = Path(__file__).resolve().parent / "deploy_support" / "schemas"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
OPERATIONS = ROOT / "docs" / "operations.md"
DATABASE_WIDE_GAUGES = (
    "pgreact_events_pending",
    "pgreact_oldest_pending_age_seconds",
    "pgreact_events_dead",
    "pgreact_notify_queue_usage",
)
CONTRACT_METRICS = (
    "pgreact_notifications_received_total",
    "pgreact_events_handled_total",
    "pgreact_handler_duration_seconds",
    "pgreact_event_lag_seconds",
    "pgreact_events_pending",
    "pgreact_oldest_pending_age_seconds",
    "pgreact_events_dead",
    "pgreact_listener_connected",
    "pgreact_listener_reconnects_total",
    "pgreact_notify_queue_usage",
    "pgreact_db_pool_connections",
    "pgreact_build_info",
)
REQUIRED_ALERTS = (
    "PgreactListenerDisconnected",
    "PgreactBacklogGrowing",
    "PgreactOldestPendingTooOld",
    "PgreactDeadLetters",
    "PgreactHandlerFailureRatioHigh",
    "PgreactNotifyQueueUsageHigh",
    "PgreactNoReadyReplicas",
)


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "pgreact_deploy_generate", ROOT / "deploy/generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# -- Dockerfile -------------------------------------------------------------------------------


def test_hadolint_reports_nothing() -> None:
    hadolint = require_tool("hadolint")
    result = run_tool([hadolint, "--failure-threshold", "warning", "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr
    # The linter is live at this threshold: an unpinned base image is a warning it reports.
    bad = run_tool(
        [hadolint, "--failure-threshold", "warning", "-"], input="FROM python:latest\nUSER 1\n"
    )
    assert bad.returncode != 0 and "DL3007" in bad.stdout


@cache
def _dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    parser.content  # noqa: B018 - read now, not lazily later
    return parser


def _stages() -> list[list[dict[str, Any]]]:
    stages: list[list[dict[str, Any]]] = []
    for instruction in _dockerfile().structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _values(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def test_dockerfile_is_multi_stage_with_pinned_bases() -> None:
    stages = _stages()
    assert len(stages) >= 2, "a build stage and a runtime stage"
    for stage in stages:
        image = _values(stage, "FROM")[0].split()[0]
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image), f"pin {image} by full tag"
    build_runs = " ".join(" ".join(_values(s, "RUN")) for s in stages[:-1])
    assert "pip wheel" in build_runs and "--only-binary=:all:" in build_runs


def test_dockerfile_runtime_stage_is_hardened() -> None:
    final = _stages()[-1]
    # Non-root, numeric user and group (runAsNonRoot can verify a number, not a name).
    (user,) = _values(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    # Nothing is built or installed in the runtime stage.
    runs = " ".join(_values(final, "RUN"))
    for tool in ("gcc", "build-essential", "apt-get install", "pip install", "pip wheel", "make "):
        assert tool not in runs, f"{tool!r} in the runtime stage"
    assert "pip uninstall" in runs, "packaging tools are removed from the runtime image"
    copies = _values(final, "COPY")
    assert copies == ["--from=build /opt/pgreact /opt/pgreact"], copies
    # pgreact is the entry command, as PID 1 (exec form, no shell in between).
    (entrypoint,) = _values(final, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["/opt/pgreact/bin/pgreact"]
    assert json.loads(_values(final, "CMD")[0]) == ["run"]
    assert _values(final, "STOPSIGNAL") == ["SIGTERM"]
    # Works on a read-only root filesystem: no bytecode writes, HOME and TMPDIR in /tmp.
    env = _dockerfile().envs
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == env["TMPDIR"] == "/tmp"  # noqa: S108 - the image's emptyDir
    assert env["PATH"].startswith("/opt/pgreact/bin:")
    # The port the settings default to, and OCI labels.
    assert _values(final, "EXPOSE") == [str(load_settings(environ={}).http_port)]
    labels = _dockerfile().labels
    for key in ("title", "description", "version", "licenses", "source"):
        assert labels.get(f"org.opencontainers.image.{key}"), key


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "deny by default"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for stage in _stages():
        for value in _values(stage, "COPY"):
            if value.startswith("--from="):
                continue
            *sources, _dest = value.split()
            assert set(sources) <= allowed, f"COPY {sources} is excluded by .dockerignore"
    assert not {".venv", ".git", "tests"} & allowed


def _child_pid(parent: int) -> int | None:
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except FileNotFoundError:
        return None
    return int(children[0]) if children else None


def _run_as_pid_1(pg_dsn: str, tmp_path: Path) -> tuple[int, str]:
    """Start ``pgreact run`` as PID 1 of a new PID namespace (what a container gives it), wait
    until it has started, send SIGTERM, return the exit code and the log."""
    unshare = require_tool("unshare")
    pgreact = VENV_BIN / "pgreact"
    if not pgreact.exists():
        missing(f"{pgreact} is missing: run `.venv/bin/pip install -e '.[test]'`")
    probe = run_tool([unshare, "--pid", "--fork", "--kill-child", "true"])
    if probe.returncode != 0:
        missing(f"cannot create a PID namespace here (needs root): {probe.stderr.strip()}")
    create_tables(pg_dsn)
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "PGREACT_DATABASE_URL": libpq(pg_dsn).replace("postgresql://", "postgresql+asyncpg://"),
        "PGREACT_HANDLERS": "tests.deploy_support.handlers",
        "PGREACT_HTTP_HOST": "127.0.0.1",
        "PGREACT_HTTP_PORT": str(port),
        "PGREACT_LOG_FORMAT": "json",
        "PGREACT_SHUTDOWN_TIMEOUT": "5",
    }
    # What the init container does.
    installed = subprocess.run(
        [pgreact, "install"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert installed.returncode == 0, installed.stderr
    log_path = tmp_path / "pgreact.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [unshare, "--pid", "--fork", "--kill-child", pgreact, "run"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 30
        while "started" not in _events(log_path.read_text()):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "not started in 30 s:\n" + log_path.read_text()
            time.sleep(0.1)
        child = _child_pid(proc.pid)
        assert child is not None
        nspid = re.search(r"^NSpid:\s+(.*)$", Path(f"/proc/{child}/status").read_text(), re.M)
        assert nspid is not None and nspid.group(1).split()[-1] == "1", "pgreact is PID 1"
        os.kill(child, signal.SIGTERM)
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, log_path.read_text()


def _events(output: str) -> set[str]:
    events = set()
    for line in output.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                events.add(str(record.get("event")))
    return events


def test_entry_command_drains_and_exits_0_on_sigterm_as_pid_1(pg_dsn: str, tmp_path: Path) -> None:
    """The kernel gives PID 1 no default signal actions: SIGTERM works only because pgreact
    handles it itself (no init process needed in the image)."""
    code, output = _run_as_pid_1(pg_dsn, tmp_path)
    assert code == 0, output
    assert {"signal_received", "stopping", "stopped"} <= _events(output), output


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- Kubernetes -------------------------------------------------------------------------------


@cache
def _render(overlay: str) -> str:
    kubectl = require_tool("kubectl")
    result = run_tool([kubectl, "kustomize", f"k8s/overlays/{overlay}"])
    assert result.returncode == 0, result.stderr
    return result.stdout


def _docs(overlay: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_render(overlay)) if d]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _env_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The environment the daemon container gets from its ConfigMap and Secret."""
    config = _one(docs, "ConfigMap")["data"]
    secret = {
        k: base64.b64decode(v).decode() for k, v in _one(docs, "Secret").get("data", {}).items()
    }
    return {**config, **secret}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("kubernetes_version", ["1.29.0", "latest"])
def test_overlay_passes_kubernetes_validate_strict(
    overlay: str, kubernetes_version: str, tmp_path: Path
) -> None:
    validator = require_tool("kubernetes-validate")
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(_render(overlay))
    args = [validator, "--strict"]
    if kubernetes_version != "latest":
        args += ["--kubernetes-version", kubernetes_version]
    result = run_tool([*args, rendered])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout
    # Only the custom resources lack a schema there; they are checked below.
    skipped = set(re.findall(r"Couldn't find schema for kind (\w+)", result.stdout))
    assert skipped <= set(CRD_KINDS), skipped
    passed = re.findall(r"passed for resource (\S+)", result.stdout)
    assert len(passed) + len(re.findall("WARN", result.stdout)) == len(_docs(overlay))


def test_kubernetes_validate_rejects_unknown_fields(tmp_path: Path) -> None:
    validator = require_tool("kubernetes-validate")
    docs = _docs("prod")
    deployment = copy.deepcopy(_one(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    result = run_tool([validator, "--strict", bad])
    assert result.returncode != 0 and "httpGett" in result.stdout


@cache
def _crd_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / f"{kind.lower()}.json").read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator: jsonschema.protocols.Validator = validator_class(schema)
    return validator


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        for e in _crd_validator(doc["kind"]).iter_errors(doc)
    ]


def test_custom_resources_match_their_crd_schemas(overlay: str) -> None:
    docs = _docs(overlay)
    kinds = {d["kind"] for d in docs} & set(CRD_KINDS)
    assert kinds >= {"PodMonitor", "PrometheusRule"}
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            assert _crd_errors(doc) == [], doc["kind"]


def test_crd_schemas_reject_mistakes() -> None:
    docs = _docs("prod")
    scaled = copy.deepcopy(_one(docs, "ScaledObject"))
    scaled["spec"]["minReplicas"] = 2  # the HPA spelling, not KEDA's
    assert _crd_errors(scaled)
    scaled = copy.deepcopy(_one(docs, "ScaledObject"))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 500  # must be a string
    assert _crd_errors(scaled)
    monitor = copy.deepcopy(_one(docs, "PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    assert _crd_errors(monitor)
    rule = copy.deepcopy(_one(docs, "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "a minute"
    assert _crd_errors(rule)


def test_deployment_probes_security_and_shutdown(overlay: str) -> None:
    docs = _docs(overlay)
    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    env = _env_of(docs)
    settings = load_settings(environ=env)  # pgreact itself accepts the configuration
    assert settings.require_handlers()
    # Every handler transaction in flight holds a pooled connection; housekeeping and the
    # readiness ping need one more.
    assert settings.pool_size + settings.max_overflow >= settings.concurrency + 2

    assert pod["automountServiceAccountToken"] is False
    sa = _one(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_timeout + 5
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}

    (main,) = pod["containers"]
    for container in [main, *pod.get("initContainers", [])]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/tmp") in tmp_volumes, "a writable emptyDir on /tmp"  # noqa: S108
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
        assert refs == {
            _one(docs, "ConfigMap")["metadata"]["name"],
            _one(docs, "Secret")["metadata"]["name"],
        }
    assert [c["args"] for c in pod["initContainers"]] == [["install"]]
    assert main["args"] == ["run"]

    (port,) = main["ports"]
    assert port["containerPort"] == settings.http_port
    probes = {name: main[name] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert probes["startupProbe"]["httpGet"]["path"] == "/livez"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["httpGet"]["port"] == port["name"]

    # Everything selects the pods the Deployment makes.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Deployment", "PodDisruptionBudget", "PodMonitor"):
        selector = _one(docs, kind)["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), kind
    monitor = _one(docs, "PodMonitor")["spec"]
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")
    assert labels[monitor["jobLabel"]] == "pgreact", 'the alerts expect job="pgreact"'
    assert _one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert (
        _one(docs, "PrometheusRule")["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    )


def test_base_runs_two_replicas() -> None:
    kubectl = require_tool("kubectl")
    result = run_tool([kubectl, "kustomize", "k8s/base"])
    assert result.returncode == 0, result.stderr
    base = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert _one(base, "Deployment")["spec"]["replicas"] == 2
    kinds = {d["kind"] for d in base}
    assert kinds == {
        "ServiceAccount",
        "ConfigMap",
        "Secret",
        "Deployment",
        "PodDisruptionBudget",
        "PodMonitor",
        "PrometheusRule",
    }


def test_dev_overlay_one_replica_console_logs() -> None:
    docs = _docs("dev")
    assert _one(docs, "Deployment")["spec"]["replicas"] == 1
    env = _env_of(docs)
    assert env["PGREACT_LOG_FORMAT"] == "console"
    assert not [d for d in docs if d["kind"] == "ScaledObject"]


def test_prod_overlay_pgbouncer_direct_listen_and_keda() -> None:
    docs = _docs("prod")
    settings = load_settings(environ=_env_of(docs))
    assert settings.pooler == "pgbouncer-transaction"
    write = httpx.URL(settings.require_database_url())
    listen = httpx.URL(settings.effective_listen_url)
    assert write.port == 6432 and "pgbouncer" in (write.host or ""), "writes through PgBouncer"
    assert listen.port == 5432 and listen.host != write.host, "LISTEN directly on PostgreSQL"
    assert settings.listener_driver == settings.write_driver

    deployment = _one(docs, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA made by KEDA owns the replica count"
    scaled = _one(docs, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["minReplicaCount"] == 2 <= scaled["maxReplicaCount"]
    assert settings.replicas >= scaled["maxReplicaCount"], "connection budget covers the max"
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    assert "pgreact_events_pending" in trigger["metadata"]["query"]
    assert f'namespace="{deployment["metadata"]["namespace"]}"' in trigger["metadata"]["query"]


def test_secrets_hold_example_values_only(overlay: str) -> None:
    for key, value in _env_of(_docs(overlay)).items():
        if key.endswith("_URL"):
            password = httpx.URL(value.replace("+asyncpg", "").replace("+psycopg", "")).password
            assert password in ("change-me", "dev-only"), f"{key} carries a real-looking password"


def test_yamllint_clean() -> None:
    yamllint = require_tool("yamllint")
    config = ROOT / "tests" / "deploy_support" / "yamllint.yaml"
    result = run_tool([yamllint, "--strict", "-f", "parsable", "-c", config, "k8s", "deploy"])
    assert result.returncode == 0, result.stdout + result.stderr


# -- alert rules ------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    result = run_tool([promtool, "check", "rules", "deploy/prometheus/pgreact.rules.yml"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_rule_unit_tests() -> None:
    promtool = require_tool("promtool")
    result = run_tool([promtool, "test", "rules", "deploy/prometheus/pgreact.rules.test.yml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    suite = yaml.safe_load((ROOT / "deploy/prometheus/pgreact.rules.test.yml").read_text())
    cases: dict[str, set[bool]] = {}
    for test in suite["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    for rule in alert_rules():
        assert cases.get(rule["alert"]) == {True, False}, rule["alert"]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_alerts_are_complete_and_have_runbooks() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= set(REQUIRED_ALERTS)
    anchors = _anchors(RUNBOOKS.read_text())
    for rule in rules:
        annotations = rule["annotations"]
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        url = annotations["runbook_url"]
        assert url.split("#")[0].endswith("docs/runbooks.md"), url
        assert url.split("#")[1] in anchors, f"no runbook section for {url}"


def test_prometheus_rule_embeds_exactly_the_rules_file() -> None:
    generator = _generator()
    committed = (ROOT / "k8s/base/prometheusrule.yaml").read_text()
    assert committed == generator.render_prometheus_rule(), "run python deploy/generate.py"
    assert yaml.safe_load(committed)["spec"] == load_rules()


# -- Grafana dashboard ------------------------------------------------------------------------


def test_dashboard_is_generated_from_code() -> None:
    generator = _generator()
    committed = (ROOT / "deploy/grafana/pgreact.json").read_text()
    assert committed == generator.render_dashboard(), "run python deploy/generate.py"
    result = run_tool([sys.executable, "deploy/generate.py", "--check"])
    assert result.returncode == 0, result.stderr


def _panels() -> Iterator[dict[str, Any]]:
    return iter_panels(load_dashboard()["panels"])


def test_dashboard_structure() -> None:
    board = load_dashboard()
    assert board["schemaVersion"] >= 39
    variables = dashboard_variables(board)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["pod"]["includeAll"] and variables["pod"]["allValue"] == ".*"
    rows = [p["title"] for p in _panels() if p["type"] == "row"]
    for row in ("Throughput", "Latency", "Backlog", "Dead letters", "Listener", "Database pool"):
        assert row in rows
    assert "NOTIFY queue" in rows
    ids = [p["id"] for p in _panels()]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in _panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_dashboard_queries_filter_and_aggregate_correctly() -> None:
    queries = dashboard_queries()
    exprs = " ".join(q.expr for q in queries)
    for metric in CONTRACT_METRICS:
        assert metric in exprs, f"{metric} is on no panel"
    for quantile in ("0.5", "0.95", "0.99"):
        for histogram in ("pgreact_event_lag_seconds", "pgreact_handler_duration_seconds"):
            assert f"histogram_quantile({quantile}, sum by (le) (rate({histogram}_bucket" in exprs
    for query in queries:
        selectors = re.findall(r"pgreact_\w+\{([^}]*)\}", query.expr)
        assert selectors, query
        for selector in selectors:
            assert 'namespace="$namespace"' in selector and 'pod=~"$pod"' in selector, query
        # Rates and increases are summed; database-wide gauges are combined with max.
        for match in re.finditer(r"(rate|increase)\(", query.expr):
            before = query.expr[: match.start()]
            assert re.search(r"sum(?: by \([^)]*\))? ?\($", before), query
        for gauge in DATABASE_WIDE_GAUGES:
            for match in re.finditer(rf"{gauge}\{{", query.expr):
                before = query.expr[: match.start()]
                assert re.search(r"max(?: by \([^)]*\))? ?\($", before), query


# -- docs -------------------------------------------------------------------------------------


def test_operations_guide_covers_the_topics() -> None:
    text = OPERATIONS.read_text().lower()
    for topic in (
        "kubectl kustomize",
        "connection budget",
        "pgbouncer",
        "keda",
        "pgreact install",
        "--print-sql",
        "terminationgraceperiodseconds",
    ):
        assert topic in text, topic
    for metric in CONTRACT_METRICS:
        assert metric in text, f"docs/operations.md does not explain {metric}"
