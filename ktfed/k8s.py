"""Kubernetes deployment helpers: site overlays, rendering, validation, probes.

    ktfed k8s site NAME --coordinator-host H [--coordinator-cidr C | --coordinator-namespace NS] [--gpu]
                                          write k8s/overlays/sites/NAME (a kustomize overlay)
    ktfed k8s render OVERLAY [--validate] print `kubectl kustomize OVERLAY`, optionally checked
    ktfed k8s check [OVERLAY ...]         schema (kubernetes-validate, strict) + ktfed's own rules
    ktfed k8s lint-dockerfile FILE ...    the container files' rules (user, tags, secrets, healthcheck)
    ktfed k8s probe grpc|heartbeat ...    the health probes the pods and images run

`python -m ktfed.k8s ...` runs the same commands without the rest of the CLI; the pods' exec
probes use that form. This module imports only the standard library at load time (the probes
run every few seconds inside the pods): grpc, PyYAML and kubernetes-validate load on use.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The Kubernetes version whose schemas the manifests are validated against (kubernetes-validate
# ships schemas for 1.25 .. 1.37 offline). Raise it together with the clusters we support.
KUBERNETES_VERSION = "1.32.0"

GRPC_PORT = 50051
DEFAULT_REGISTRY = "registry.example.org/ktfed"
DEFAULT_TAG = "0.1.0"
DEFAULT_NAMESPACE = "ktfed"
DEFAULT_TLS_DIR = "/etc/ktfed/tls"
HEARTBEAT_FILE = "heartbeat.json"
# Heartbeat statuses in which the agent holds (or is using) a session with the coordinator.
CONNECTED_STATUSES = frozenset({"connected", "training"})
# Objects the manifests reference but that operators create from files they hold (never committed).
EXTERNAL_OBJECTS = frozenset({
    ("Secret", "ktfed-coordinator-tls"),
    ("Secret", "ktfed-participant-tls"),
    ("ConfigMap", "ktfed-crl"),
})
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet", "Pod")

REPO_ROOT = Path(__file__).resolve().parent.parent
K8S_ROOT = REPO_ROOT / "k8s"

_SITE_PATTERN = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")
_HOST_PATTERN = re.compile(r"(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_TAG_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_REGISTRY_PATTERN = re.compile(r"[a-z0-9]([a-z0-9._:-]*[a-z0-9])?(/[a-z0-9]([a-z0-9._-]*[a-z0-9])?)*")


class K8sError(Exception):
    """Invalid input to a k8s command, or a render that failed; the message says which."""


# -- site overlays ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SiteSpec:
    """What `ktfed k8s site` needs to write one site's overlay."""

    name: str
    coordinator_host: str
    coordinator_port: int = GRPC_PORT
    coordinator_cidrs: tuple[str, ...] = ()
    coordinator_namespace: str | None = None
    gpu: bool = False
    gpus: int = 1
    namespace: str = DEFAULT_NAMESPACE
    registry: str = DEFAULT_REGISTRY
    tag: str = DEFAULT_TAG

    def validated(self) -> "SiteSpec":
        if not isinstance(self.name, str) or not _SITE_PATTERN.fullmatch(self.name):
            raise K8sError(f"site name {self.name!r}: must be a certificate name that is also a Kubernetes "
                           "label value: lower-case letters, digits, '.', '-', starting and ending with a "
                           "letter or digit, at most 63 characters")
        host = self.coordinator_host.strip().lower().rstrip(".") if isinstance(self.coordinator_host, str) else ""
        ip = _ip_or_none(host.strip("[]"))
        if ip is None and not _HOST_PATTERN.fullmatch(host):
            raise K8sError(f"--coordinator-host {self.coordinator_host!r}: not a DNS name or an IP address")
        if isinstance(self.coordinator_port, bool) or not isinstance(self.coordinator_port, int) \
                or not 1 <= self.coordinator_port <= 65535:
            raise K8sError(f"--coordinator-port {self.coordinator_port!r}: must be 1..65535")
        cidrs = []
        for text in self.coordinator_cidrs:
            try:
                cidrs.append(str(ipaddress.ip_network(text, strict=True)))
            except ValueError as err:
                raise K8sError(f"--coordinator-cidr {text!r}: {err}") from None
        if not cidrs and ip is not None:
            cidrs.append(str(ipaddress.ip_network(ip)))
        if self.coordinator_namespace is not None and not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
                                                                       self.coordinator_namespace):
            raise K8sError(f"--coordinator-namespace {self.coordinator_namespace!r}: not a namespace name")
        if not cidrs and self.coordinator_namespace is None:
            raise K8sError(f"--coordinator-host {host!r} is a DNS name and a NetworkPolicy selects by IP: give "
                           "--coordinator-cidr (the address range the name resolves to, e.g. the coordinator's "
                           "load balancer /32), or --coordinator-namespace when the coordinator runs in this "
                           "cluster")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", self.namespace or ""):
            raise K8sError(f"--namespace {self.namespace!r}: not a namespace name")
        if not _REGISTRY_PATTERN.fullmatch(self.registry or ""):
            raise K8sError(f"--registry {self.registry!r}: not an image repository prefix")
        if not _TAG_PATTERN.fullmatch(self.tag or "") or self.tag == "latest":
            raise K8sError(f"--tag {self.tag!r}: give a fixed image tag (not 'latest')")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or not 1 <= self.gpus <= 16:
            raise K8sError(f"--gpus {self.gpus!r}: must be 1..16")
        return SiteSpec(self.name, host, self.coordinator_port, tuple(cidrs), self.coordinator_namespace,
                        bool(self.gpu), self.gpus, self.namespace, self.registry, self.tag)

    @property
    def coordinator_address(self) -> str:
        host = self.coordinator_host
        if ":" in host and not host.startswith("["):  # an IPv6 literal
            host = f"[{host}]"
        return f"{host}:{self.coordinator_port}"

    def command(self) -> str:
        """The command line that writes this overlay (recorded in its kustomization)."""
        parts = ["ktfed", "k8s", "site", self.name, "--coordinator-host", self.coordinator_host]
        if self.coordinator_port != GRPC_PORT:
            parts += ["--coordinator-port", str(self.coordinator_port)]
        for cidr in self.coordinator_cidrs:
            parts += ["--coordinator-cidr", cidr]
        if self.coordinator_namespace:
            parts += ["--coordinator-namespace", self.coordinator_namespace]
        if self.gpu:
            parts.append("--gpu")
            if self.gpus != 1:
                parts += ["--gpus", str(self.gpus)]
        if self.namespace != DEFAULT_NAMESPACE:
            parts += ["--namespace", self.namespace]
        if self.registry != DEFAULT_REGISTRY:
            parts += ["--registry", self.registry]
        if self.tag != DEFAULT_TAG:
            parts += ["--tag", self.tag]
        return shlex.join(parts)


def _ip_or_none(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def site_overlay_files(spec: SiteSpec, base_rel: str) -> dict[str, str]:
    """The files of one site's overlay: name -> text. `base_rel` is the participant base, relative
    to the overlay folder."""
    spec = spec.validated()
    image = f"{spec.registry}/participant-cuda" if spec.gpu else f"{spec.registry}/participant"
    patches = ["  - path: networkpolicy-egress.yaml\n"]
    if spec.gpu:
        patches.append("  - path: gpu.yaml\n")
    kustomization = (
        f"# Generated by `{spec.command()}`.\n"
        "# Regenerate (with --force) rather than edit by hand; local additions go in extra patches.\n"
        f"# Before `kubectl apply -k`, create secret ktfed-participant-tls in namespace {spec.namespace}\n"
        "# (ca.crt, tls.crt, tls.key of this site's certificate): see k8s/README.md.\n"
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"namespace: {spec.namespace}\n"
        "resources:\n"
        f"  - {base_rel}\n"
        "labels:\n"
        "  - pairs:\n"
        f"      ktfed.io/site: {spec.name}\n"
        "    includeSelectors: false\n"
        "images:\n"
        "  - name: ktfed-participant\n"
        f"    newName: {image}\n"
        f'    newTag: "{spec.tag}"\n'
        "configMapGenerator:\n"
        "  - name: ktfed-participant\n"
        "    behavior: merge\n"
        "    literals:\n"
        f"      - KTFED_SITE={spec.name}\n"
        f"      - KTFED_COORDINATOR={spec.coordinator_address}\n"
        "patches:\n" + "".join(patches))

    to = []
    for cidr in spec.coordinator_cidrs:
        to.append(f"        - ipBlock:\n            cidr: {cidr}\n")
    if spec.coordinator_namespace:
        to.append("        - namespaceSelector:\n"
                  "            matchLabels:\n"
                  f"              kubernetes.io/metadata.name: {spec.coordinator_namespace}\n"
                  "          podSelector:\n"
                  "            matchLabels:\n"
                  "              app.kubernetes.io/name: ktfed-coordinator\n")
    egress = (
        f"# Egress of site {spec.name}: DNS, and the coordinator ({spec.coordinator_address}) only.\n"
        "apiVersion: networking.k8s.io/v1\n"
        "kind: NetworkPolicy\n"
        "metadata:\n"
        "  name: ktfed-participant\n"
        "spec:\n"
        "  egress:\n"
        "    - to:\n"
        "        - namespaceSelector:\n"
        "            matchLabels:\n"
        "              kubernetes.io/metadata.name: kube-system\n"
        "          podSelector:\n"
        "            matchLabels:\n"
        "              k8s-app: kube-dns\n"
        "      ports:\n"
        "        - port: 53\n"
        "          protocol: UDP\n"
        "        - port: 53\n"
        "          protocol: TCP\n"
        "    - to:\n" + "".join(to) +
        "      ports:\n"
        f"        - port: {spec.coordinator_port}\n"
        "          protocol: TCP\n")
    files = {"kustomization.yaml": kustomization, "networkpolicy-egress.yaml": egress}
    if spec.gpu:
        files["gpu.yaml"] = (
            f"# Site {spec.name} trains on {spec.gpus} GPU(s): the CUDA image, the device resource, and a\n"
            "# toleration for the usual taint of GPU nodes.\n"
            "apiVersion: apps/v1\n"
            "kind: Deployment\n"
            "metadata:\n"
            "  name: ktfed-participant\n"
            "spec:\n"
            "  template:\n"
            "    spec:\n"
            "      tolerations:\n"
            "        - key: nvidia.com/gpu\n"
            "          operator: Exists\n"
            "          effect: NoSchedule\n"
            "      containers:\n"
            "        - name: participant\n"
            "          resources:\n"
            "            requests:\n"
            "              memory: 8Gi\n"
            f'              nvidia.com/gpu: "{spec.gpus}"\n'
            "            limits:\n"
            "              memory: 16Gi\n"
            f'              nvidia.com/gpu: "{spec.gpus}"\n')
    return files


def _find_participant_base(start: Path) -> Path | None:
    for folder in [start, *start.parents]:
        candidate = folder / "base" / "participant"
        if (candidate / "kustomization.yaml").is_file():
            return candidate
    return None


def write_site_overlay(spec: SiteSpec, out: Path, *, base: Path | None = None, force: bool = False) -> Path:
    """Write OUT/NAME/ (kustomization + patches) and return that folder."""
    spec = spec.validated()
    out = Path(out).absolute()
    target = out / spec.name
    if base is None:
        base = _find_participant_base(out) or K8S_ROOT / "base" / "participant"
    base = Path(base).absolute()
    if not (base / "kustomization.yaml").is_file():
        raise K8sError(f"participant base not found at {base}: give --base (the k8s/base/participant folder)")
    if target.exists() and not force:
        raise K8sError(f"{target} exists: pass --force to regenerate it")
    files = site_overlay_files(spec, Path(os.path.relpath(base, target)).as_posix())
    target.mkdir(parents=True, exist_ok=True)
    for stale in ("gpu.yaml",):  # a regenerated CPU site must not keep an old GPU patch
        if stale not in files and (target / stale).exists():
            (target / stale).unlink()
    for name, text in files.items():
        (target / name).write_text(text)
    return target


# -- rendering and validation -------------------------------------------------------------------

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


def _selects(selector: dict, labels: dict) -> bool:
    if not isinstance(selector, dict):
        return False
    if selector.get("matchExpressions"):
        return False  # not used here; count only what we can evaluate exactly
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


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
    for doc in docs:
        if doc.get("kind") == "Secret":
            problems.append(f"{_describe(doc)}: a Secret is rendered from the repository; certificates and "
                            "keys must come from the operators (kubectl create secret), never from git")
    return problems


def check_overlay(overlay: Path, version: str = KUBERNETES_VERSION) -> list[str]:
    docs = load_documents(render(overlay))
    return validate_schemas(docs, version) + check_rules(docs)


def find_overlays(root: Path = K8S_ROOT) -> list[Path]:
    """Every overlay under ROOT/overlays: the folders that hold a kustomization.yaml."""
    return sorted(p.parent for p in (Path(root) / "overlays").rglob("kustomization.yaml"))


# -- Dockerfile lint ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their first line number; continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker too
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        line = " ".join(part for part in buffer if part)
        buffer = []
        keyword, _, args = line.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    if buffer:
        line = " ".join(buffer)
        keyword, _, args = line.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    return out


_SECRET_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE|(^|_)KEY($|_)|APIKEY)", re.I)
_SECRET_PATH = re.compile(r"(^|/)(pki|secrets?|\.ssh|\.env)(/|$)|\.(key|pem|crt|p12|pfx|jks)$|id_(rsa|ed25519|ecdsa)",
                          re.I)


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def _exec_or_shell(args: str) -> list[str]:
    if args.startswith("["):
        try:
            value = json.loads(args)
            if isinstance(value, list):
                return [str(v) for v in value]
        except json.JSONDecodeError:
            pass
    try:
        return shlex.split(args)
    except ValueError:
        return args.split()


def _key_values(args: str) -> list[tuple[str, str]]:
    """ENV/LABEL/ARG operands: `K=V K2="v 2"` or the legacy `K V`."""
    words = _exec_or_shell(args)
    if words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [tuple(w.split("=", 1)) if "=" in w else (w, "") for w in words]


def _secret_operands(ins: Instruction) -> list[str]:
    pairs = _key_values(ins.args) if ins.keyword == "ENV" else \
        [tuple(w.split("=", 1)) if "=" in w else (w, "") for w in _exec_or_shell(ins.args)]
    problems = []
    for name, value in pairs:
        if _SECRET_NAME.search(name):
            problems.append(f"line {ins.line}: {ins.keyword} {name}: secrets must not be baked into an image "
                            "(mount them at run time)")
        elif "-----BEGIN" in value:
            problems.append(f"line {ins.line}: {ins.keyword} {name} holds PEM material")
    return problems


def lint_dockerfile(text: str) -> list[str]:
    """The container-file rules: pinned base images (a tag that is not 'latest', or a digest), a
    numeric non-root USER before CMD/ENTRYPOINT and in force at the end, a HEALTHCHECK, no COPY/ADD
    of key or certificate material or of the whole context, no remote ADD, no secret-named ENV/ARG."""
    problems: list[str] = []
    instructions = parse_dockerfile(text)
    global_args: dict[str, str] = {}
    stages: dict[str, dict] = {}
    stage: dict | None = None
    for ins in instructions:
        if ins.keyword == "ARG" and stage is None:
            for word in _exec_or_shell(ins.args):
                if "=" in word:  # an ARG without a default stays unresolved
                    name, value = word.split("=", 1)
                    global_args[name] = value
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            if not words:
                problems.append(f"line {ins.line}: FROM without an image")
                continue
            image = _expand(words[0], global_args)
            alias = words[2].lower() if len(words) >= 3 and words[1].upper() == "AS" else None
            parent = stages.get(image.lower())
            stage = {"user": parent["user"] if parent else None,
                     "healthcheck": parent["healthcheck"] if parent else False, "line": ins.line}
            if parent is None and image != "scratch":
                if "$" in image:
                    problems.append(f"line {ins.line}: base image {words[0]!r} is not pinned (unresolved ARG)")
                else:
                    problem = _image_problem(image)
                    if problem:
                        problems.append(f"line {ins.line}: base {problem}")
            if alias:
                stages[alias] = stage
            continue
        if stage is None and ins.keyword == "ARG":
            problems.extend(_secret_operands(ins))
            continue
        if stage is None:
            if ins.keyword not in ("ARG",):
                problems.append(f"line {ins.line}: {ins.keyword} before the first FROM")
            continue
        if ins.keyword == "USER":
            user = _expand(ins.args.split()[0] if ins.args else "", global_args)
            uid = user.split(":", 1)[0]
            if not uid.isdigit():
                problems.append(f"line {ins.line}: USER {user!r}: use a numeric UID (Kubernetes can then "
                                "verify runAsNonRoot)")
            elif int(uid) == 0:
                problems.append(f"line {ins.line}: USER {user!r} is root")
            stage["user"] = uid
        elif ins.keyword in ("CMD", "ENTRYPOINT"):
            if stage["user"] is None or not stage["user"].isdigit() or int(stage["user"]) == 0:
                problems.append(f"line {ins.line}: {ins.keyword} before a non-root USER is set")
        elif ins.keyword == "HEALTHCHECK":
            stage["healthcheck"] = ins.args.split()[0].upper() != "NONE" if ins.args else False
        elif ins.keyword in ("COPY", "ADD"):
            words = [w for w in _exec_or_shell(ins.args) if not w.startswith("--")]
            from_stage = any(w.startswith("--from") for w in _exec_or_shell(ins.args))
            for source in words[:-1]:
                if ins.keyword == "ADD" and re.match(r"(https?|git)://|git@", source):
                    problems.append(f"line {ins.line}: ADD of remote content {source!r} (unpinned, unverified)")
                if _SECRET_PATH.search(source):
                    problems.append(f"line {ins.line}: {ins.keyword} {source!r} would bake key or certificate "
                                    "material into the image")
                if not from_stage and source.rstrip("/") in (".", "./", "*"):
                    problems.append(f"line {ins.line}: {ins.keyword} {source!r} copies the whole build context "
                                    "(any key in the working tree would be baked in): copy named folders")
        elif ins.keyword in ("ENV", "ARG"):
            problems.extend(_secret_operands(ins))
    if stage is None:
        problems.append("no FROM")
        return problems
    if stage["user"] is None or not stage["user"].isdigit() or int(stage["user"]) == 0:
        problems.append("the final stage does not run as a numeric non-root USER")
    if not stage["healthcheck"]:
        problems.append("the final stage has no HEALTHCHECK")
    return problems


def pip_installs(text: str) -> list[str]:
    """The `pip install` commands of RUN instructions, in order (for the torch-first rule)."""
    found = []
    for ins in parse_dockerfile(text):
        if ins.keyword == "RUN":
            for part in re.split(r"&&|;", ins.args):
                if re.search(r"\bpip3?\s+install\b|-m\s+pip\s+install\b", part):
                    found.append(" ".join(part.split()))
    return found


# -- probes -------------------------------------------------------------------------------------

def probe_grpc(address: str, service: str = "", *, tls_dir: str | None = DEFAULT_TLS_DIR,
               ca: str | None = None, cert: str | None = None, key: str | None = None,
               insecure: bool = False, server_name: str | None = None, timeout: float = 3.0,
               accept_not_serving: bool = False) -> tuple[int, str]:
    """Ask the standard gRPC health service at ADDRESS (mutual TLS with the given files).

    0 when it answers SERVING for SERVICE; with accept_not_serving, any answer at all (the server
    is alive, e.g. NOT_SERVING while it resumes). 1 otherwise. The message says what was seen."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if insecure:
        channel = grpc.insecure_channel(address, options=options)
    else:
        ca = ca or os.path.join(tls_dir or DEFAULT_TLS_DIR, "ca.crt")
        cert = cert or os.path.join(tls_dir or DEFAULT_TLS_DIR, "tls.crt")
        key = key or os.path.join(tls_dir or DEFAULT_TLS_DIR, "tls.key")
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes(),
                                                 private_key=Path(key).read_bytes(),
                                                 certificate_chain=Path(cert).read_bytes())
        except OSError as err:
            return 1, f"cannot read TLS material: {err}"
        channel = grpc.secure_channel(address, creds, options=options)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=timeout)
    except grpc.RpcError as err:
        if accept_not_serving and err.code() == grpc.StatusCode.NOT_FOUND:
            return 0, f"alive ({service!r} unknown to the health service)"
        return 1, f"health check of {address} failed: {err.code().name}: {err.details()}"
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return 0, f"{service or '(server)'}: SERVING"
    if accept_not_serving:
        return 0, f"alive: {service or '(server)'} is {status}"
    return 1, f"{service or '(server)'}: {status}"


def write_heartbeat(path: Path, site: str, status: str, round_no: int = 0) -> None:
    """The heartbeat file format (the participant agent writes it; the probe reads it): a JSON
    object written atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"site": site, "status": status, "round": round_no, "time": time.time()}))
    os.replace(tmp, path)


def probe_heartbeat(path: str | Path, max_age: float, *, require_connected: bool = False,
                    now: float | None = None) -> tuple[int, str]:
    """0 when PATH was written at most MAX_AGE seconds ago (and, with require_connected, says the
    agent holds a session with the coordinator); 1 otherwise."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return 1, f"no heartbeat file at {path} (agent not started, or too old to write one)"
    age = (time.time() if now is None else now) - st.st_mtime
    if age > max_age:
        return 1, f"heartbeat {path} is {age:.0f}s old (> {max_age:g}s): the agent is stuck"
    if not require_connected:
        return 0, f"heartbeat {age:.0f}s old"
    try:
        beat = json.loads(path.read_text())
        status = beat["status"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return 1, f"heartbeat {path} unreadable: {err}"
    if status not in CONNECTED_STATUSES:
        return 1, f"agent is {status!r}, not connected to the coordinator"
    return 0, f"agent {status} (round {beat.get('round', '?')}), heartbeat {age:.0f}s old"


# -- commands -----------------------------------------------------------------------------------

def cmd_site(args) -> int:
    spec = SiteSpec(name=args.name, coordinator_host=args.coordinator_host, coordinator_port=args.coordinator_port,
                    coordinator_cidrs=tuple(args.coordinator_cidr or ()),
                    coordinator_namespace=args.coordinator_namespace, gpu=args.gpu, gpus=args.gpus,
                    namespace=args.namespace, registry=args.registry, tag=args.tag)
    try:
        target = write_site_overlay(spec, Path(args.out), base=Path(args.base) if args.base else None,
                                    force=args.force)
    except K8sError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    spec = spec.validated()
    try:
        shown = target.relative_to(Path.cwd())
    except ValueError:
        shown = target
    print(f"wrote {shown}")
    print("next, at the site:")
    print(f"  ktfed pki issue --dir PKI --role participant --name {spec.name}   # at the federation's CA")
    print(f"  kubectl create namespace {spec.namespace}")
    print(f"  kubectl -n {spec.namespace} create secret generic ktfed-participant-tls "
          f"--from-file=ca.crt=PKI/ca.crt --from-file=tls.crt=PKI/issued/{spec.name}.crt "
          f"--from-file=tls.key=PKI/issued/{spec.name}.key")
    print(f"  kubectl apply -k {shown}")
    return 0


def cmd_render(args) -> int:
    try:
        text = render(Path(args.overlay))
    except K8sError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.validate:
        docs = load_documents(text)
        problems = validate_schemas(docs, args.kubernetes_version) + check_rules(docs)
        if problems:
            for p in problems:
                print(f"error: {args.overlay}: {p}", file=sys.stderr)
            return 1
    sys.stdout.write(text)
    return 0


def cmd_check(args) -> int:
    overlays = [Path(o) for o in args.overlays] or find_overlays(Path(args.root))
    failed = 0
    for overlay in overlays:
        try:
            problems = check_overlay(overlay, args.kubernetes_version)
        except K8sError as err:
            problems = [str(err)]
        for p in problems:
            print(f"error: {overlay}: {p}", file=sys.stderr)
        print(f"{overlay}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        failed += bool(problems)
    return 1 if failed else 0


def cmd_lint(args) -> int:
    failed = 0
    for name in args.files:
        problems = lint_dockerfile(Path(name).read_text())
        for p in problems:
            print(f"error: {name}: {p}", file=sys.stderr)
        print(f"{name}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        failed += bool(problems)
    return 1 if failed else 0


def cmd_probe(args) -> int:
    if args.probe_kind == "grpc":
        code, message = probe_grpc(args.address, args.service, tls_dir=args.tls_dir, ca=args.ca, cert=args.cert,
                                   key=args.key, insecure=args.insecure, server_name=args.server_name,
                                   timeout=args.timeout, accept_not_serving=args.accept_not_serving)
    else:
        code, message = probe_heartbeat(args.file, args.max_age, require_connected=args.require_connected)
    print(message, file=sys.stdout if code == 0 else sys.stderr)
    return code


def add_k8s_commands(subparsers) -> None:
    """Register `ktfed k8s ...` on the CLI's subparsers (called from ktfed.cli.build_parser)."""
    k8s = subparsers.add_parser("k8s", help="Kubernetes: site overlays, render/check manifests, probes")
    sub = k8s.add_subparsers(dest="k8s_command", required=True)

    p = sub.add_parser("site", help="write a participant overlay for one site")
    p.add_argument("name", help="the site's name (its certificate's CN)")
    p.add_argument("--coordinator-host", required=True, help="the coordinator's DNS name or IP, as participants dial it")
    p.add_argument("--coordinator-port", type=int, default=GRPC_PORT)
    p.add_argument("--coordinator-cidr", action="append",
                   help="address range of the coordinator for the egress NetworkPolicy (repeatable; "
                        "default: the host when it is an IP)")
    p.add_argument("--coordinator-namespace", help="the coordinator runs in this cluster, in this namespace")
    p.add_argument("--gpu", action="store_true", help="the CUDA image and an nvidia.com/gpu resource")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per participant with --gpu")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help="image repository prefix")
    p.add_argument("--tag", default=DEFAULT_TAG, help="image tag (never 'latest')")
    p.add_argument("--out", default="k8s/overlays/sites", help="folder of site overlays")
    p.add_argument("--base", help="the participant base (default: found above --out)")
    p.add_argument("--force", action="store_true", help="overwrite an existing overlay")
    p.set_defaults(func=cmd_site)

    p = sub.add_parser("render", help="print an overlay's manifests (kubectl kustomize)")
    p.add_argument("overlay")
    p.add_argument("--validate", action="store_true", help="check schemas and rules first")
    p.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("check", help="render and validate overlays (all under ROOT/overlays by default)")
    p.add_argument("overlays", nargs="*")
    p.add_argument("--root", default=str(K8S_ROOT))
    p.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("lint-dockerfile", help="check container files against the image rules")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_lint)

    p = sub.add_parser("probe", help="health probes run by pods and images (exit 0 = healthy)")
    probe_sub = p.add_subparsers(dest="probe_kind", required=True)
    g = probe_sub.add_parser("grpc", help="the gRPC health service over mutual TLS")
    g.add_argument("--address", default=f"127.0.0.1:{GRPC_PORT}")
    g.add_argument("--service", default="", help="health service name ('' = the whole server)")
    g.add_argument("--tls-dir", default=os.environ.get("KTFED_TLS_DIR", DEFAULT_TLS_DIR),
                   help="folder with ca.crt, tls.crt, tls.key")
    g.add_argument("--ca")
    g.add_argument("--cert")
    g.add_argument("--key")
    g.add_argument("--insecure", action="store_true", help="plaintext (servers run with --insecure only)")
    g.add_argument("--server-name", help="TLS name to verify instead of the address's host")
    g.add_argument("--timeout", type=float, default=3.0)
    g.add_argument("--accept-not-serving", action="store_true",
                   help="healthy if the server answers at all (liveness)")
    h = probe_sub.add_parser("heartbeat", help="the participant agent's heartbeat file")
    h.add_argument("--file", required=True)
    h.add_argument("--max-age", type=float, default=60.0, help="seconds")
    h.add_argument("--require-connected", action="store_true", help="also require a session with the coordinator")
    p.set_defaults(func=cmd_probe)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ktfed.k8s", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_k8s_commands(subparsers)
    args = parser.parse_args(["k8s", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
