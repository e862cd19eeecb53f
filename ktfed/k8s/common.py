"""Shared pieces of ktfed.k8s: versions, defaults, paths, the error type, the image-tag rule.

Standard library only (the probes import this package every few seconds inside the pods)."""
from __future__ import annotations

from pathlib import Path

from kt_core.heartbeat import HEARTBEAT_FILE  # noqa: F401 - one name for the file, re-exported

# The Kubernetes version whose schemas the manifests are validated against (kubernetes-validate
# ships schemas for 1.25 .. 1.37 offline). Raise it together with the clusters we support.
KUBERNETES_VERSION = "1.32.0"

GRPC_PORT = 50051
DEFAULT_REGISTRY = "registry.example.org/ktfed"
DEFAULT_TAG = "0.1.0"
DEFAULT_NAMESPACE = "ktfed"
DEFAULT_TLS_DIR = "/etc/ktfed/tls"
METRICS_PORT = 9090
# Where the cluster's DNS pods run and how they are labelled (kube-dns and CoreDNS by default).
DEFAULT_DNS_NAMESPACE = "kube-system"
DEFAULT_DNS_LABELS = (("k8s-app", "kube-dns"),)
# Heartbeat statuses in which the agent holds (or is using) a session with the coordinator.
CONNECTED_STATUSES = frozenset({"connected", "training"})
# Objects the manifests reference but that operators create from files they hold (never committed).
EXTERNAL_OBJECTS = frozenset({
    ("Secret", "ktfed-coordinator-tls"),
    ("Secret", "ktfed-participant-tls"),
    ("ConfigMap", "ktfed-crl"),
})
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet", "Pod")

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
K8S_ROOT = REPO_ROOT / "k8s"


class K8sError(Exception):
    """Invalid input to a k8s command, or a render that failed; the message says which."""


def _image_problem(image: object) -> str | None:
    if not isinstance(image, str) or not image:
        return "has no image"
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image!r} has no tag (means latest)"
    if last.rsplit(":", 1)[1] == "latest":
        return f"image {image!r} uses the 'latest' tag"
    return None
