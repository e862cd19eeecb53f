"""Rendering overlays (kubectl kustomize) and checking the manifests: Kubernetes schemas
(kubernetes-validate, strict) and ktfed's own rules. PyYAML and kubernetes-validate load on use."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .common import EXTERNAL_OBJECTS, K8S_ROOT, KUBERNETES_VERSION, WORKLOAD_KINDS, K8sError, _image_problem


def kustomize_command() -> list[str] | None:
    kubectl = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if kubectl:
        return [kubectl, "kustomize"]
    kustomize = shutil.which("kustomize")
    return [kustomize, "build"] if kustomize else None


def render(overlay: Path, timeout: float = 60) -> str:
    """`kubectl kustomize OVERLAY` (or `kustomize build`): the manifests as one YAML stream."""
    command = kustomize_command()
    if command is None:
        raise K8sError("neither kubectl nor kustomize is on PATH: cannot render overlays")
    done = subprocess.run([*command, str(overlay)], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise K8sError(f"rendering {overlay} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def load_documents(text: str) -> list[dict]:
    import yaml

    return [doc for doc in yaml.safe_load_all(text) if doc]


def _describe(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind', '?')}/{meta.get('name', '?')}"


def validate_schemas(docs: list[dict], version: str = KUBERNETES_VERSION, strict: bool = True) -> list[str]:
    """Each document against the Kubernetes OpenAPI schema of `version` (strict: unknown fields are
    errors). A kind without a schema is an error too: nothing passes unchecked."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict)
        except ValidationError as err:
            where = ".".join(str(p) for p in err.path) or "(top)"
            problems.append(f"{_describe(doc)}: {where}: {err.message} (Kubernetes {err.version}, strict)")
        except SchemaNotFoundError as err:
            problems.append(f"{_describe(doc)}: {err.message}")
    return problems


def _pod_spec(doc: dict) -> dict | None:
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec")
    if kind in WORKLOAD_KINDS:
        return (spec.get("template") or {}).get("spec")
    return None


def _pod_labels(doc: dict) -> dict:
    if doc.get("kind") == "Pod":
        return (doc.get("metadata") or {}).get("labels") or {}
    spec = doc.get("spec") or {}
    if doc.get("kind") == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    return ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}


def _selects(selector: dict, labels: dict) -> bool:
    if not isinstance(selector, dict):
        return False
    if selector.get("matchExpressions"):
        return False  # not used here; count only what we can evaluate exactly
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _container_problems(c: dict, cwhat: str, is_init: bool, pod_sc: dict, volumes: dict, claim_templates: set,
                        present: set) -> list[str]:
    """One container's image, probes, resources, security context, mounts and env references."""
    problems: list[str] = []
    problem = _image_problem(c.get("image"))
    if problem:
        problems.append(f"{cwhat}: {problem}")
    if not is_init:
        for probe in ("readinessProbe", "livenessProbe"):
            if not c.get(probe):
                problems.append(f"{cwhat}: no {probe}")
    resources = c.get("resources") or {}
    for kind in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if not (resources.get(kind) or {}).get(res):
                problems.append(f"{cwhat}: resources.{kind}.{res} not set")
    sc = c.get("securityContext") or {}
    run_as_non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    run_as_user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if run_as_non_root is not True:
        problems.append(f"{cwhat}: runAsNonRoot is not true")
    if not isinstance(run_as_user, int) or isinstance(run_as_user, bool) or run_as_user <= 0:
        problems.append(f"{cwhat}: runAsUser must be a non-zero numeric UID, got {run_as_user!r}")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{cwhat}: readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{cwhat}: allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        problems.append(f"{cwhat}: privileged")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        problems.append(f"{cwhat}: capabilities do not drop ALL")
    if (sc.get("capabilities") or {}).get("add"):
        problems.append(f"{cwhat}: adds capabilities")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{cwhat}: seccompProfile must be RuntimeDefault (got {seccomp!r})")
    for mount in c.get("volumeMounts") or []:
        if mount.get("name") not in volumes and mount.get("name") not in claim_templates:
            problems.append(f"{cwhat}: mounts unknown volume {mount.get('name')!r}")
    for env in c.get("env") or []:
        source = env.get("valueFrom") or {}
        for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
            if key in source:
                ref = (kind, source[key].get("name"))
                if ref not in present and ref not in EXTERNAL_OBJECTS:
                    problems.append(f"{cwhat}: env {env.get('name')} uses {kind} {ref[1]!r}, which is "
                                    "neither rendered nor one the operators create")
    return problems


def check_rules(docs: list[dict]) -> list[str]:
    """ktfed's own rules, beyond the schema: every container is probed, non-root, read-only,
    capability-free, resource-bounded and on a pinned image; every workload sits behind a
    NetworkPolicy; every Secret/ConfigMap it uses is rendered or one the operators provide."""
    problems: list[str] = []
    present = {(d.get("kind"), (d.get("metadata") or {}).get("name")) for d in docs}
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    workloads = [d for d in docs if _pod_spec(d) is not None]
    if not policies:
        problems.append("no NetworkPolicy in the rendered overlay")
    if not workloads:
        problems.append("no workload (Deployment/StatefulSet/...) in the rendered overlay")
    for policy in policies:
        types = (policy.get("spec") or {}).get("policyTypes") or []
        if "Ingress" not in types or "Egress" not in types:
            problems.append(f"{_describe(policy)}: policyTypes must list Ingress and Egress (default deny both)")

    for doc in workloads:
        what = _describe(doc)
        pod = _pod_spec(doc) or {}
        labels = _pod_labels(doc)
        if not any(_selects((p.get("spec") or {}).get("podSelector"), labels) for p in policies):
            problems.append(f"{what}: no NetworkPolicy selects its pods")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{what}: automountServiceAccountToken must be false")
        if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
            problems.append(f"{what}: uses the host's network/PID/IPC namespace")
        pod_sc = pod.get("securityContext") or {}
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        for volume in volumes.values():
            if "hostPath" in volume:
                problems.append(f"{what}: volume {volume.get('name')} is a hostPath")
            refs = []
            if "secret" in volume:
                refs.append(("Secret", volume["secret"].get("secretName")))
            if "configMap" in volume:
                refs.append(("ConfigMap", volume["configMap"].get("name")))
            if "persistentVolumeClaim" in volume:
                refs.append(("PersistentVolumeClaim", volume["persistentVolumeClaim"].get("claimName")))
            for ref in refs:
                if ref not in present and ref not in EXTERNAL_OBJECTS:
                    problems.append(f"{what}: volume {volume.get('name')} uses {ref[0]} {ref[1]!r}, which is "
                                    "neither rendered nor one the operators create (EXTERNAL_OBJECTS)")
        claim_templates = {(t.get("metadata") or {}).get("name")
                           for t in (doc.get("spec") or {}).get("volumeClaimTemplates") or []}
        containers = list(pod.get("initContainers") or []) + list(pod.get("containers") or [])
        for c in containers:
            cwhat = f"{what} container {c.get('name')}"
            is_init = c in (pod.get("initContainers") or [])
            problems += _container_problems(c, cwhat, is_init, pod_sc, volumes, claim_templates, present)
    for doc in docs:
        if doc.get("kind") == "Secret":
            problems.append(f"{_describe(doc)}: a Secret is rendered from the repository; certificates and "
                            "keys must come from the operators (kubectl create secret), never from git")
    return problems


def check_overlay(overlay: Path, version: str = KUBERNETES_VERSION) -> list[str]:
    docs = load_documents(render(overlay))
    return validate_schemas(docs, version) + check_rules(docs)


def find_overlays(root: Path = K8S_ROOT) -> list[Path]:
    """Every overlay under ROOT/overlays: the folders that hold a kustomization.yaml, except those
    inside another (a self-contained site overlay's own copy of the base)."""
    found = sorted(p.parent for p in (Path(root) / "overlays").rglob("kustomization.yaml"))
    return [d for d in found if not any(o != d and d.is_relative_to(o) for o in found)]
