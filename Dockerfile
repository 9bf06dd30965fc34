# The speechtune operator image: the engine, the kopf handlers and the PostgreSQL driver; no torch, no NeMo.
# Build from the repository root:  docker build -t speechtune-operator .
# Install it with the Helm chart: helm install speechtune charts/speechtune (README, docs/operator.md).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer_image/speechtune_trainer/ trainer_image/speechtune_trainer/
RUN pip install . && rm -rf /src

# A numeric non-root user, so runAsNonRoot can be verified without /etc/passwd.
USER 65532:65532
WORKDIR /tmp
# 8080: Prometheus /metrics; 8081: kopf's liveness /healthz.
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "speechtune.k8s"]
