# syntax=docker/dockerfile:1
# A site's ktfed participant agent for GPU nodes. Build from the repository root:
#   docker build -f k8s/images/participant-cuda.Dockerfile -t registry.example.org/ktfed/participant-cuda:0.1.0 .
# torch's Linux wheel from the default index is the CUDA build and carries its CUDA runtime
# libraries (nvidia-* wheels), so a plain Python base is enough; the node provides the driver
# (NVIDIA device plugin / container toolkit). Same layout and rules as participant.Dockerfile.

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned (the CUDA build here, on purpose).
RUN pip install torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kt_core ./kt_core
COPY security ./security
COPY coordinator ./coordinator
COPY participant ./participant
COPY ktfed ./ktfed
RUN pip install . && python -m compileall -q /opt/venv/lib

FROM python:3.11.13-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    KTFED_TLS_DIR=/etc/ktfed/tls \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --system --gid 10001 ktfed \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin ktfed \
 && mkdir -p /var/lib/ktfed/state /etc/ktfed/tls /data \
 && chown 10001:10001 /var/lib/ktfed/state
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/ktfed
VOLUME ["/var/lib/ktfed/state"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD ["python", "-m", "ktfed.k8s", "probe", "heartbeat", "--file=/var/lib/ktfed/state/heartbeat.json", "--max-age=60"]
# Kubernetes passes the real arguments (`args:` in k8s/base/participant/deployment.yaml); with
# `docker run IMAGE participant run --site NAME --coordinator HOST:PORT --ca ... --cert ... --key ...`.
ENTRYPOINT ["ktfed"]
CMD ["participant", "run", "--help"]
