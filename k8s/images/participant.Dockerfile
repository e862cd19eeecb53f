# syntax=docker/dockerfile:1
# A site's ktfed participant agent (CPU). Build from the repository root:
#   docker build -f k8s/images/participant.Dockerfile -t registry.example.org/ktfed/participant:0.1.0 .
# No certificate or key is baked in: Kubernetes mounts the site's (k8s/README.md). Writable paths
# are volumes only (/var/lib/ktfed/state, /tmp); the data volume (/data) is mounted read-only.

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned, from the CPU index: letting a later requirement resolve torch pulls a
# multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
# Named folders only (never `COPY .`): a PKI or key in the working tree cannot end up in a layer.
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
    KTFED_TLS_DIR=/etc/ktfed/tls
RUN groupadd --system --gid 10001 ktfed \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin ktfed \
 && mkdir -p /var/lib/ktfed/state /etc/ktfed/tls /data \
 && chown 10001:10001 /var/lib/ktfed/state
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/ktfed
VOLUME ["/var/lib/ktfed/state"]
# The agent serves nothing: the check reads the heartbeat file it keeps in its state folder.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD ["python", "-m", "ktfed.k8s", "probe", "heartbeat", "--file=/var/lib/ktfed/state/heartbeat.json", "--max-age=60"]
# Kubernetes passes the real arguments (`args:` in k8s/base/participant/deployment.yaml); with
# `docker run IMAGE participant run --site NAME --coordinator HOST:PORT --ca ... --cert ... --key ...`.
ENTRYPOINT ["ktfed"]
CMD ["participant", "run", "--help"]
