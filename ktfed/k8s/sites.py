"""Site overlays: SiteSpec (validated input of `ktfed k8s site`) and the kustomize overlay it writes."""
from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from .common import (DEFAULT_DNS_LABELS, DEFAULT_DNS_NAMESPACE, DEFAULT_NAMESPACE, DEFAULT_REGISTRY, DEFAULT_TAG,
                     GRPC_PORT, K8S_ROOT, K8sError)

_SITE_PATTERN = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")
_HOST_PATTERN = re.compile(r"(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_LABEL_KEY = re.compile(r"([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?")
_TAG_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_REGISTRY_PATTERN = re.compile(r"[a-z0-9]([a-z0-9._:-]*[a-z0-9])?(/[a-z0-9]([a-z0-9._-]*[a-z0-9])?)*")


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
    # The cluster's DNS pods, for the egress rule: kube-dns and CoreDNS label them so by default.
    dns_namespace: str = DEFAULT_DNS_NAMESPACE
    dns_labels: tuple[tuple[str, str], ...] = DEFAULT_DNS_LABELS

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
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", self.dns_namespace or ""):
            raise K8sError(f"--dns-namespace {self.dns_namespace!r}: not a namespace name")
        if not self.dns_labels:
            raise K8sError("--dns-label: give at least one KEY=VALUE that selects the cluster's DNS pods")
        for key, value in self.dns_labels:
            if not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
                raise K8sError(f"--dns-label {key}={value}: not a Kubernetes label KEY=VALUE")
        return SiteSpec(self.name, host, self.coordinator_port, tuple(cidrs), self.coordinator_namespace,
                        bool(self.gpu), self.gpus, self.namespace, self.registry, self.tag, self.dns_namespace,
                        tuple(self.dns_labels))

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
        if self.dns_namespace != DEFAULT_DNS_NAMESPACE:
            parts += ["--dns-namespace", self.dns_namespace]
        if tuple(self.dns_labels) != DEFAULT_DNS_LABELS:
            for key, value in self.dns_labels:
                parts += ["--dns-label", f"{key}={value}"]
        return shlex.join(parts)


def _yaml_string(value: str) -> str:
    return f'"{value}"' if value in ("", "true", "false", "yes", "no", "on", "off", "null") or value.isdigit() else value


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

    files = {"kustomization.yaml": kustomization, "networkpolicy-egress.yaml": _egress_policy(spec)}
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


def _egress_policy(spec: SiteSpec) -> str:
    """The NetworkPolicy patch: egress to the DNS pods and to the coordinator only."""
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
    return (
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
        f"              kubernetes.io/metadata.name: {spec.dns_namespace}\n"
        "          podSelector:\n"
        "            matchLabels:\n"
        + "".join(f"              {key}: {_yaml_string(value)}\n" for key, value in spec.dns_labels) +
        "      ports:\n"
        "        - port: 53\n"
        "          protocol: UDP\n"
        "        - port: 53\n"
        "          protocol: TCP\n"
        "    - to:\n" + "".join(to) +
        "      ports:\n"
        f"        - port: {spec.coordinator_port}\n"
        "          protocol: TCP\n")


def _find_participant_base(start: Path) -> Path | None:
    for folder in [start, *start.parents]:
        candidate = folder / "base" / "participant"
        if (candidate / "kustomization.yaml").is_file():
            return candidate
    return None


def write_site_overlay(spec: SiteSpec, out: Path, *, base: Path | None = None, force: bool = False) -> Path:
    """Write OUT/NAME/ (kustomization + patches) and return that folder. Inside the k8s folder that
    holds the base the overlay refers to it (../../../base/participant); anywhere else the base is
    copied into OUT/NAME/base, so the folder is whole where it was written: it can be moved, kept
    in the site's own repository, rendered and checked there."""
    spec = spec.validated()
    out = Path(out).absolute()
    target = out / spec.name
    if base is None:
        base = _find_participant_base(out) or K8S_ROOT / "base" / "participant"
    base = Path(base).absolute()
    if not (base / "kustomization.yaml").is_file():
        raise K8sError(f"participant base not found at {base}: give --base (the k8s/base/participant folder)")
    if target.exists() and not force:
        raise K8sError(f"{target} exists: give --force to regenerate it")
    k8s_root = base.parent.parent
    vendored = not target.is_relative_to(k8s_root)
    files = site_overlay_files(spec, "base" if vendored else Path(os.path.relpath(base, target)).as_posix())
    target.mkdir(parents=True, exist_ok=True)
    for stale in ("gpu.yaml",):  # a regenerated CPU site must not keep an old GPU patch
        if stale not in files and (target / stale).exists():
            (target / stale).unlink()
    if (target / "base").is_dir():
        shutil.rmtree(target / "base")
    if vendored:
        shutil.copytree(base, target / "base", ignore=shutil.ignore_patterns(".*"))
    for name, text in files.items():
        (target / name).write_text(text)
    return target
