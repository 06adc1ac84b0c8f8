#!/usr/bin/env bash
# Installs the external tools the test suite drives for real: PgBouncer (transaction-mode pooling
# tests) and Prometheus/promtool (alert rules, end-to-end scrape). Debian packages, installed only
# when missing. Without root or apt-get it says what is missing; those tests then skip locally,
# and fail under CI=true, where every tool must be present.
set -euo pipefail

need=()
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-test-tools: missing ${need[*]} (install them with your package manager)" >&2
  exit 0
fi
echo "install-test-tools: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The packages start system services; the tests start their own instances on free ports.
for svc in pgbouncer prometheus; do
  if command -v systemctl >/dev/null 2>&1; then systemctl stop "$svc" >/dev/null 2>&1 || true; fi
  pkill -x "$svc" >/dev/null 2>&1 || true
done
