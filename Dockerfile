# syntax=docker/dockerfile:1
# A first, working image; the hardened multi-stage build comes with the Kubernetes issue.
FROM python:3.11-slim-bookworm
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY listeners ./listeners
RUN pip install --no-cache-dir . && useradd --uid 10001 --no-create-home pgreact
USER 10001
EXPOSE 9000
ENTRYPOINT ["pgreact"]
CMD ["run"]
