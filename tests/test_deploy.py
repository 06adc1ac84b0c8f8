"""The deploy artifacts, each checked by the tool of its ecosystem.

- ``Dockerfile``: hadolint (no warnings), its structure with dockerfile-parse (bases pinned by
  digest, installs through ``constraints.txt``), and the entry command's SIGTERM handling as PID 1
  of a fresh PID namespace (what a container gives it).
- ``k8s/``: every overlay and its ``install/`` kustomization rendered with ``kubectl kustomize``,
  validated with ``kubernetes-validate --strict``; the custom resources against their CRD schemas
  (vendored in ``tests/deploy_support/schemas``); the settings checked by pgreact's own settings
  loader; install as a Job under its own Secret (no init container); no committed credentials;
  NetworkPolicies and the restricted Namespace; yamllint over every YAML file.
- ``deploy/prometheus``: ``promtool check rules`` and ``promtool test rules``; the PrometheusRule
  embeds exactly the same rules; every alert has a runbook, a unit test and no hard-coded
  namespace or Deployment.
- ``deploy/grafana``: regenerating the dashboard yields the committed JSON; its structure; every
  metric of ``pgreact.metrics`` on a panel and every runbook linked.

A missing tool skips locally and fails under ``CI=true``.
"""

from __future__ import annotations

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
    exported_metrics,
    iter_panels,
    load_dashboard,
    load_rules,
)
from tests.deploy_support.tools import ROOT, VENV_BIN, missing, require_tool, run_tool
from tests.support import create_tables, libpq

OVERLAYS = ("dev", "prod")
# What kubectl renders: each overlay's daemon and its install Job, applied in two steps.
RENDERED = (*OVERLAYS, *(f"{o}/install" for o in OVERLAYS))
CRD_KINDS = ("PodMonitor", "PrometheusRule", "ScaledObject")
# The Secrets a database operator generates (CloudNativePG and Crunchy PGO both name the URL key
# `uri`; Crunchy adds `pgbouncer-uri`), standing in for the Secrets no manifest may carry.
OPERATOR_SECRETS = {
    "pgreact-db": {
        "uri": "postgresql://pgreact:s3cret@hippo-primary.database.svc:5432/app",
        "pgbouncer-uri": "postgresql://pgreact:s3cret@hippo-pgbouncer.database.svc:5432/app",
    },
    "pgreact-install-db": {
        "uri": "postgresql://pgreact_ddl:s3cret@hippo-primary.database.svc:5432/app",
    },
}
EXTERNAL_SECRETS = ROOT / "k8s" / "examples" / "externalsecret.yaml"
SCHEMAS = Path(__file__).resolve().parent / "deploy_support" / "schemas"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
OPERATIONS = ROOT / "docs" / "operations.md"
DATABASE_WIDE_GAUGES = (
    "pgreact_events_pending",
    "pgreact_events_waiting_retry",
    "pgreact_oldest_pending_age_seconds",
    "pgreact_events_dead",
    "pgreact_capture_broken",
    "pgreact_notify_queue_usage",
)
REQUIRED_ALERTS = {
    "PgreactListenerDisconnected": "pgreact_listener_connected",
    "PgreactBacklogGrowing": "pgreact_events_pending",
    "PgreactOldestPendingTooOld": "pgreact_oldest_pending_age_seconds",
    "PgreactDeadLetters": "pgreact_events_dead",
    "PgreactHandlerFailureRatioHigh": "pgreact_events_handled_total",
    "PgreactNotifyQueueUsageHigh": "pgreact_notify_queue_usage",
    "PgreactNoReadyReplicas": "kube_pod_status_ready",
    "PgreactTargetDown": "up",
    "PgreactMetricsAbsent": "absent(up",
    "PgreactTransientErrors": "pgreact_transient_errors_total",
    "PgreactClaimsReaped": "pgreact_claims_reaped_total",
    "PgreactNotificationsDropped": "pgreact_notifications_dropped_total",
    "PgreactPoolSaturated": "pgreact_db_pool_connections",
    "PgreactCaptureBroken": "pgreact_capture_broken",
}


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
    images = {_values(stage, "FROM")[0].split()[0] for stage in stages}
    assert len(images) == 1, f"build and runtime on the same base: {images}"
    (image,) = images
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+@sha256:[0-9a-f]{64}", image), (
        f"pin {image} by full tag and digest"
    )
    digest = image.partition("@")[2]
    assert _dockerfile().labels["org.opencontainers.image.base.digest"] == digest
    build_runs = " ".join(" ".join(_values(s, "RUN")) for s in stages[:-1])
    assert "pip wheel" in build_runs and "--only-binary=:all:" in build_runs
    # Every dependency at the version the tests ran with.
    assert "--constraint constraints.txt" in build_runs
    copied = " ".join(" ".join(_values(s, "COPY")) for s in stages[:-1])
    assert "constraints.txt" in copied.split()


def test_constraints_pin_everything_the_venv_installs() -> None:
    """constraints.txt is exact (``==`` pins only) and covers pgreact's own dependencies."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = [
        line.strip()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    pins = {}
    for line in lines:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", line
        pins[canonicalize_name(req.name)] = spec.version
    assert "pgreact" not in pins, "the project itself is not a constraint"
    for text in requires("pgreact") or []:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} (a dependency of pgreact) is not pinned"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name])


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
    # What the install Job does before the Deployment rolls out.
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
def _render(kustomization: str) -> str:
    kubectl = require_tool("kubectl")
    result = run_tool([kubectl, "kustomize", f"k8s/overlays/{kustomization}"])
    assert result.returncode == 0, result.stderr
    return result.stdout


def _docs(kustomization: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_render(kustomization)) if d]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (container,) = _one(docs, kind)["spec"]["template"]["spec"]["containers"]
    return container


def _secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Variable → (Secret, key) of every ``secretKeyRef`` of a container."""
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def _env_of(docs: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, str]:
    """The environment the workload's container gets: its ConfigMap, and its secretKeyRefs
    resolved against the Secrets a database operator generates."""
    env = dict(_one(docs, "ConfigMap")["data"])
    for name, (secret, key) in _secret_refs(_container(docs, kind)).items():
        env[name] = OPERATOR_SECRETS[secret][key]
    return env


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("kubernetes_version", ["1.29.0", "latest"])
@pytest.mark.parametrize("kustomization", RENDERED)
def test_overlay_passes_kubernetes_validate_strict(
    kustomization: str, kubernetes_version: str, tmp_path: Path
) -> None:
    validator = require_tool("kubernetes-validate")
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(_render(kustomization))
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
    assert len(passed) + len(re.findall("WARN", result.stdout)) == len(_docs(kustomization))


def test_kubernetes_validate_rejects_unknown_fields(tmp_path: Path) -> None:
    validator = require_tool("kubernetes-validate")
    docs = _docs("prod")
    deployment = copy.deepcopy(_one(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    policy = copy.deepcopy(_one(docs, "NetworkPolicy"))
    policy["spec"]["egress"][0]["to"][0]["namespaceSelecter"] = {}
    for doc, mistake in ((deployment, "httpGett"), (policy, "namespaceSelecter")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(doc))
        result = run_tool([validator, "--strict", bad])
        assert result.returncode != 0 and mistake in result.stdout, result.stdout


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


def _check_hardened(pod: dict[str, Any]) -> None:
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    for container in [*pod["containers"], *pod.get("initContainers", [])]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/tmp") in tmp_volumes, "a writable emptyDir on /tmp"  # noqa: S108
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_deployment_probes_security_and_shutdown(overlay: str) -> None:
    docs = _docs(overlay)
    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    env = _env_of(docs)
    settings = load_settings(environ=env)  # pgreact itself accepts the configuration
    assert settings.require_handlers()
    # One rule: handler transactions in flight stay below the pool's own connections.
    assert settings.concurrency <= settings.pool_size - 1
    assert settings.config_warnings() == []

    sa = _one(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_timeout + 5
    _check_hardened(pod)

    (main,) = pod["containers"]
    refs = {next(iter(r.values()))["name"] for r in main["envFrom"]}
    assert refs == {_one(docs, "ConfigMap")["metadata"]["name"]}, "no Secret through envFrom"
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


def test_install_runs_as_a_job_under_its_own_role_not_in_the_pods(overlay: str) -> None:
    """The daemon's pods never run DDL (no init container, no install); a Job does, from its
    own kustomization, with its own Secret, the same image and the very same ConfigMap."""
    docs = _docs(overlay)
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in pod, "install must not run in every pod"
    for container in pod["containers"]:
        assert "install" not in container.get("args", []) + container.get("command", [])
    assert not [d for d in docs if d["kind"] == "Job"], "the Job is applied (and awaited) first"

    install = _docs(f"{overlay}/install")
    job = _one(install, "Job")
    job_pod = job["spec"]["template"]["spec"]
    (container,) = job_pod["containers"]
    assert container["args"] == ["install"]
    assert job_pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["ttlSecondsAfterFinished"] > 0
    _check_hardened(job_pod)
    assert job_pod["serviceAccountName"] == _one(install, "ServiceAccount")["metadata"]["name"]
    assert job["metadata"]["namespace"] == _one(docs, "Deployment")["metadata"]["namespace"]
    # Its own role: a different Secret from the daemon's.
    daemon_secrets = {s for s, _ in _secret_refs(_container(docs, "Deployment")).values()}
    (install_secret,) = {s for s, _ in _secret_refs(container).values()}
    assert install_secret not in daemon_secrets
    # Same image, same settings (the same generated ConfigMap name means the same content).
    assert container["image"] == _container(docs, "Deployment")["image"]
    assert _one(install, "ConfigMap") == _one(docs, "ConfigMap")
    settings = load_settings(environ=_env_of(install, "Job"))
    assert settings.require_handlers()
    assert httpx.URL(settings.require_database_url()).port == 5432, "directly on PostgreSQL"
    # The Job's pods match nothing of the daemon's: not its PodDisruptionBudget, PodMonitor or
    # NetworkPolicy.
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    for kind in ("Deployment", "PodDisruptionBudget", "PodMonitor"):
        selector = _one(docs, kind)["spec"]["selector"]["matchLabels"]
        assert not selector.items() <= job_labels.items(), kind


def test_no_credentials_committed(overlay: str) -> None:
    """No Secret is rendered or generated; URLs come only through secretKeyRef."""
    for path in (ROOT / "k8s").rglob("*"):
        if path.is_file() and path.parent.name != "examples":
            text = path.read_text()
            assert "secretGenerator" not in text, path
            for word in ("change-me", "dev-only", "password"):
                assert word not in text.lower(), f"{word!r} in {path}"
    for kustomization in (overlay, f"{overlay}/install"):
        docs = _docs(kustomization)
        assert not [d for d in docs if d["kind"] == "Secret"], kustomization
        for value in _one(docs, "ConfigMap")["data"].values():
            assert "://" not in value, f"a URL in the ConfigMap of {kustomization}: {value}"
        for kind in ("Deployment", "Job"):
            for doc in docs:
                if doc["kind"] != kind:
                    continue
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    plain = {e["name"]: e.get("value") for e in container.get("env", [])}
                    assert not any(k.endswith("_URL") and v for k, v in plain.items()), plain
                    assert "PGREACT_DATABASE_URL" in _secret_refs(container)
                    # The key CloudNativePG and Crunchy PGO use for the direct URL.
                    assert {key for _, key in _secret_refs(container).values()} >= {"uri"}


def test_external_secret_example_builds_the_secrets_the_workloads_read() -> None:
    examples = [d for d in yaml.safe_load_all(EXTERNAL_SECRETS.read_text()) if d]
    built = {}
    for doc in examples:
        assert doc["apiVersion"] == "external-secrets.io/v1beta1"
        assert doc["kind"] == "ExternalSecret"
        target = doc["spec"]["target"]
        built[target["name"]] = set(target["template"]["data"])
    wanted: dict[str, set[str]] = {}
    for kustomization in RENDERED:
        for doc in _docs(kustomization):
            if doc["kind"] in ("Deployment", "Job"):
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    for secret, key in _secret_refs(container).values():
                        wanted.setdefault(secret, set()).add(key)
    assert wanted.keys() == built.keys()
    for secret, keys in wanted.items():
        assert keys <= built[secret], secret


def _policies_for(docs: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]


def _check_egress_database_and_dns_only(policy: dict[str, Any]) -> None:
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    rules = policy["spec"]["egress"]
    ports = [{(p["port"], p["protocol"]) for p in rule["ports"]} for rule in rules]
    assert all(rule["to"] for rule in rules), "every egress rule names its peers"
    dns = [rule for rule, p in zip(rules, ports, strict=True) if p == {(53, "UDP"), (53, "TCP")}]
    assert len(dns) == 1, "DNS over UDP and TCP"
    (peer,) = dns[0]["to"]
    assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"
    }
    others = [p for p in ports if p != {(53, "UDP"), (53, "TCP")}]
    assert others, "a rule for the database"
    for p in others:
        assert p and p <= {(5432, "TCP"), (6432, "TCP")}, f"egress beyond PostgreSQL/PgBouncer: {p}"


def test_network_policies_allow_database_dns_and_scrapes_only(overlay: str) -> None:
    docs = _docs(overlay)
    deployment = _one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (policy,) = _policies_for(docs, labels)
    _check_egress_database_and_dns_only(policy)
    (ingress,) = policy["spec"]["ingress"]
    (port,) = _container(docs, "Deployment")["ports"]
    assert ingress["ports"] == [{"port": port["name"], "protocol": "TCP"}], "metrics port only"
    (peer,) = ingress["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert peer["podSelector"]["matchLabels"]  # Prometheus, not every pod there

    install = _docs(f"{overlay}/install")
    job_labels = _one(install, "Job")["spec"]["template"]["metadata"]["labels"]
    (job_policy,) = _policies_for(install, job_labels)
    assert job_policy["spec"]["ingress"] == [], "the Job accepts no connection"
    _check_egress_database_and_dns_only(job_policy)
    assert not _policies_for(docs, job_labels) and not _policies_for(install, labels)


def test_namespace_enforces_the_restricted_pod_security_standard(overlay: str) -> None:
    for kustomization in (overlay, f"{overlay}/install"):
        docs = _docs(kustomization)
        namespace = _one(docs, "Namespace")
        assert namespace["metadata"]["name"] == _one(docs, "ConfigMap")["metadata"]["namespace"]
        labels = namespace["metadata"]["labels"]
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", mode
        namespaced = [d for d in docs if d["kind"] != "Namespace"]
        assert {d["metadata"]["namespace"] for d in namespaced} == {namespace["metadata"]["name"]}


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
        "Deployment",
        "PodDisruptionBudget",
        "NetworkPolicy",
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
    assert "pgbouncer" in (write.host or ""), "writes through PgBouncer"
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
    query = re.sub(r"\s+", " ", trigger["metadata"]["query"])
    # Work that can run now: pending minus waiting for a retry, per handler.
    assert re.search(
        r"max by \(handler\) \(pgreact_events_pending\{[^}]*\}\) - "
        r"max by \(handler\) \(pgreact_events_waiting_retry\{[^}]*\}\)",
        query,
    ), query
    # Every selector picks this overlay's namespace, whatever it is called.
    namespaces = re.findall(r'namespace="([^"]*)"', query)
    assert namespaces and set(namespaces) == {deployment["metadata"]["namespace"]}, query


def test_keda_query_follows_the_overlay_namespace(tmp_path: Path) -> None:
    """The overlay's replacement copies its namespace into the query: renaming the namespace
    is one edit (``namespace:`` in the overlay)."""
    kubectl = require_tool("kubectl")
    for path in (ROOT / "k8s").rglob("*"):
        target = tmp_path / path.relative_to(ROOT)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.write_bytes(path.read_bytes())
    kustomization = tmp_path / "k8s/overlays/prod/kustomization.yaml"
    text = kustomization.read_text()
    assert text.count("\nnamespace: pgreact\n") == 1
    kustomization.write_text(text.replace("\nnamespace: pgreact\n", "\nnamespace: team-a\n"))
    result = run_tool([kubectl, "kustomize", kustomization.parent])
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    query = _one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    assert set(re.findall(r'namespace="([^"]*)"', query)) == {"team-a"}, query
    assert _one(docs, "Namespace")["metadata"]["name"] == "team-a"


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
    by_name = {r["alert"]: r for r in rules}
    for alert, source in REQUIRED_ALERTS.items():
        assert source in by_name[alert]["expr"], f"{alert} does not read {source}"
    anchors = _anchors(RUNBOOKS.read_text())
    for rule in rules:
        # One rule set for every installation: aggregate by namespace, never name one (nor a
        # Deployment); pgreact's own series are told apart by job="pgreact".
        assert not re.search(r"\b(namespace|deployment|pod)=~?\"", rule["expr"]), rule["alert"]
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
    for row in (
        "Throughput",
        "Latency",
        "Backlog",
        "Dead letters",
        "Recovery",
        "Listener",
        "Database pool",
        "Process",
        "NOTIFY queue",
    ):
        assert row in rows
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


def test_dashboard_shows_every_metric_pod_restarts_and_runbooks() -> None:
    exprs = " ".join(q.expr for q in dashboard_queries())
    metrics = exported_metrics()
    assert {"pgreact_events_waiting_retry", "pgreact_capture_broken"} <= metrics.keys()
    for metric in metrics:
        assert re.search(rf"\b{metric}\{{", exprs), f"{metric} is on no panel"
    assert "kube_pod_container_status_restarts_total{" in exprs, "pod restarts"
    links = {link["url"] for panel in _panels() for link in panel.get("links", []) if "url" in link}
    for rule in alert_rules():
        assert rule["annotations"]["runbook_url"] in links, f"no panel links {rule['alert']}"
    board_links = [link["url"] for link in load_dashboard()["links"]]
    assert any(url.endswith("docs/runbooks.md") for url in board_links)


def test_dashboard_queries_filter_and_aggregate_correctly() -> None:
    queries = dashboard_queries()
    exprs = " ".join(q.expr for q in queries)
    for quantile in ("0.5", "0.95", "0.99"):
        for histogram in ("pgreact_event_lag_seconds", "pgreact_handler_duration_seconds"):
            assert f"histogram_quantile({quantile}, sum by (le) (rate({histogram}_bucket" in exprs
    for query in queries:
        selectors = re.findall(r"[a-z_]+\{([^}]*)\}", query.expr)
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
        "--print-grants",
        "terminationgraceperiodseconds",
        "kind: job",
        "kubectl wait --for=condition=complete",
        "secretkeyref",
        "externalsecret",
        "cloudnativepg",
        "crunchy",
        "networkpolicy",
        "pod-security.kubernetes.io/enforce: restricted",
        "constraints.txt",
    ):
        assert topic in text, topic
    for metric in exported_metrics():
        name = metric.removesuffix("_bucket")
        assert name in text, f"docs/operations.md does not explain {name}"
    # The order: the install Job completes before the Deployment is applied.
    install = text.index("kubectl apply -k k8s/overlays/prod/install")
    wait = text.index("kubectl -n pgreact wait --for=condition=complete job/pgreact-install")
    daemon = text.index("kubectl apply -k k8s/overlays/prod\n")
    assert install < wait < daemon


def test_every_alert_has_a_runbook_section_with_the_three_parts() -> None:
    text = RUNBOOKS.read_text()
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    for rule in alert_rules():
        body = sections.get(rule["alert"])
        assert body, f"docs/runbooks.md has no section {rule['alert']}"
        for part in ("**What it means.**", "**How to check.**", "**How to fix.**"):
            assert part in body, (rule["alert"], part)
