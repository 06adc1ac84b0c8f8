"""A real Prometheus server (the Debian package) on loopback, for the end-to-end metrics test.

It runs in a temporary directory on a free port, scrapes the given targets every second,
evaluates the given rule files every second, and is stopped (and reaped) on exit. Queries go
through :class:`Prometheus`, a small async client of its HTTP API.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT = 20.0


class PrometheusError(AssertionError):
    """The server answered a query with an error (e.g. a PromQL parse error)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ScrapeTarget:
    job: str
    address: str
    labels: Mapping[str, str]


@dataclass
class Prometheus:
    url: str
    client: httpx.AsyncClient

    async def _get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        response = await self.client.get(f"{self.url}{path}", params=params)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(
                f"{path} {dict(params or {})}: HTTP {response.status_code}: "
                f"{body.get('errorType')}: {body.get('error')}"
            )
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query at the current time; raises :class:`PrometheusError` if it fails."""
        data = await self._get("/api/v1/query", {"query": expr})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    async def value(self, expr: str) -> float | None:
        """The single value ``expr`` returns, or None when it returns nothing."""
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else None

    async def label_values(self, label: str, match: str) -> list[str]:
        values: list[str] = await self._get(f"/api/v1/label/{label}/values", {"match[]": match})
        return values

    async def rules(self) -> list[dict[str, Any]]:
        data = await self._get("/api/v1/rules")
        return [rule for group in data["groups"] for rule in group["rules"]]

    async def alerts(self) -> list[dict[str, Any]]:
        data = await self._get("/api/v1/alerts")
        alerts: list[dict[str, Any]] = data["alerts"]
        return alerts


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    return [v for v in (float(s["value"][1]) for s in result) if math.isfinite(v)]


@contextlib.contextmanager
def running_prometheus(
    binary: str,
    workdir: Path,
    targets: Sequence[ScrapeTarget],
    rule_files: Sequence[Path] = (),
) -> Iterator[str]:
    """Run Prometheus until the block ends; yields its base URL once it is ready.

    Prometheus applies (even static) targets only after its service-discovery throttle of about
    5 s, so start it early, with every target it will need, and let targets come up later.
    """
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [
                    {"targets": [t.address], "labels": dict(t.labels)}
                    for t in targets
                    if t.job == job
                ],
            }
            for job in sorted({t.job for t in targets})
        ],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _ready(url):
            if process.poll() is not None:
                raise AssertionError(
                    f"prometheus exited with {process.returncode}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"prometheus not ready after {START_TIMEOUT:g} s:\n{_tail(log_path)}"
                )
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


@contextlib.contextmanager
def static_exporter(exposition: str) -> Iterator[str]:
    """Serve a fixed Prometheus text exposition on a free loopback port (another exporter's
    series, e.g. kube-state-metrics', for queries that join pgreact's with them); yields the
    ``host:port`` to scrape."""
    body = exposition.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="static-exporter", daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
