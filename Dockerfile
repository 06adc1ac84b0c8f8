# syntax=docker/dockerfile:1
#
# pgreact: a hardened, multi-stage image.
#
#   docker build -t pgreact:0.1.0 .
#
# Stage "build" turns pgreact and every dependency into wheels (all of them ship binary wheels,
# so no compiler is needed anywhere) and installs them into a virtualenv at /opt/pgreact.
# Stage "runtime" is the same slim Python base with only that virtualenv added: no compiler,
# no pip, no caches; a numeric non-root user; nothing is written outside /tmp, so it runs with
# a read-only root filesystem. `pgreact run` is PID 1 and handles SIGTERM itself (stop claiming,
# drain within PGREACT_SHUTDOWN_TIMEOUT, exit 0).
#
# Handlers live in your own image: FROM this one, add your package (see docs/operations.md).
# Checked by hadolint and tests/test_deploy.py.
#
# Reproducible: both stages use the same base pinned by digest, and every dependency is installed
# at the version in constraints.txt (what the tests ran with; `python3 scripts/dev.py lock`).
# The digest is the one several public repositories pin python:3.11.11-slim-bookworm to (found
# with a code search of GitHub; one notes it came from `docker inspect` RepoDigests, i.e. the
# multi-arch index), not read from Docker Hub when it was written here.
# Verify or refresh it, then change both FROM lines and the base.digest label:
#   docker buildx imagetools inspect python:3.11.11-slim-bookworm --format '{{json .Manifest.Digest}}'
#   (or: crane digest python:3.11.11-slim-bookworm)

FROM python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5 AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY listeners ./listeners
COPY service ./service

# Binary wheels only for the dependencies, at the versions in constraints.txt; pgreact itself is
# pure Python and built here.
RUN pip wheel --wheel-dir /wheels --only-binary=:all: --constraint constraints.txt ".[speed]"

# The virtualenv has no pip of its own: the base image's pip installs into it, offline.
RUN python -m venv --without-pip /opt/pgreact \
    && pip --python /opt/pgreact/bin/python install --no-index --find-links=/wheels /wheels/*.whl \
    && /opt/pgreact/bin/pgreact --version


FROM python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5 AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="pgreact" \
      org.opencontainers.image.description="PostgreSQL table changes drive Python handlers: durable, exactly-once effects, LISTEN/NOTIFY wake-ups." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/pgreact/pgreact" \
      org.opencontainers.image.documentation="https://github.com/pgreact/pgreact/blob/main/docs/operations.md" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.11-slim-bookworm" \
      org.opencontainers.image.base.digest="sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5"

# A fixed numeric user (Kubernetes' runAsNonRoot can verify it); packaging tools go, so the
# image cannot install anything at run time.
RUN groupadd --system --gid 10001 pgreact \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin pgreact \
    && python -m pip uninstall --yes --quiet pip setuptools wheel \
    && rm -rf /root/.cache

COPY --from=build /opt/pgreact /opt/pgreact

# Bytecode was compiled at install time; nothing writes .pyc files at run time. HOME and
# TMPDIR point at /tmp, the only writable path (an emptyDir in Kubernetes).
ENV PATH="/opt/pgreact/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    HOME=/tmp \
    TMPDIR=/tmp

USER 10001:10001
WORKDIR /tmp
EXPOSE 9000
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/pgreact/bin/pgreact"]
CMD ["run"]
