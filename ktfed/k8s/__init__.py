"""Kubernetes deployment helpers: site overlays, rendering, validation, probes.

    ktfed k8s site NAME --coordinator-host H [--coordinator-cidr C | --coordinator-namespace NS] [--gpu]
                                          write k8s/overlays/sites/NAME (a kustomize overlay;
                                          self-contained outside the checkout's k8s folder)
    ktfed k8s secret --pki DIR --name N  the TLS Secret (+ the coordinator's CRL ConfigMap) as YAML
    ktfed k8s render OVERLAY [--validate] print `kubectl kustomize OVERLAY`, optionally checked
    ktfed k8s check [OVERLAY ...]         schema (kubernetes-validate, strict) + ktfed's own rules
    ktfed k8s lint-dockerfile FILE ...    the container files' rules (user, tags, secrets, healthcheck)
    ktfed k8s probe grpc|heartbeat ...    the health probes the pods and images run

`python -m ktfed.k8s ...` runs the same commands without the rest of the CLI; the pods' exec
probes use that form. This package imports only the standard library at load time (the probes
run every few seconds inside the pods): grpc, PyYAML and kubernetes-validate load on use.

Modules: common (versions, defaults, K8sError), sites (SiteSpec, overlay generation), validate
(render, schemas, ktfed's rules), dockerfile (parser and image rules), probes (gRPC health,
heartbeat). This module re-exports their public names and holds the CLI.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import (CONNECTED_STATUSES, DEFAULT_DNS_LABELS, DEFAULT_DNS_NAMESPACE, DEFAULT_NAMESPACE, DEFAULT_REGISTRY, DEFAULT_TAG, DEFAULT_TLS_DIR,
                     EXTERNAL_OBJECTS, GRPC_PORT, HEARTBEAT_FILE, K8S_ROOT, KUBERNETES_VERSION, REPO_ROOT,
                     WORKLOAD_KINDS, K8sError, _image_problem)
from .dockerfile import Instruction, lint_dockerfile, parse_dockerfile, pip_installs
from .probes import probe_grpc, probe_heartbeat, write_heartbeat
from .sites import SiteSpec, site_overlay_files, write_site_overlay
from .validate import (_pod_labels, _pod_spec, _selects, check_overlay, check_rules, find_overlays,
                       kustomize_command, load_documents, render, validate_schemas)

__all__ = [
    "CONNECTED_STATUSES", "DEFAULT_NAMESPACE", "DEFAULT_REGISTRY", "DEFAULT_TAG", "DEFAULT_TLS_DIR",
    "EXTERNAL_OBJECTS", "GRPC_PORT", "HEARTBEAT_FILE", "K8S_ROOT", "KUBERNETES_VERSION", "REPO_ROOT",
    "WORKLOAD_KINDS", "K8sError", "Instruction", "lint_dockerfile", "parse_dockerfile", "pip_installs",
    "probe_grpc", "probe_heartbeat", "write_heartbeat", "SiteSpec", "site_overlay_files", "write_site_overlay",
    "check_overlay", "check_rules", "find_overlays", "kustomize_command", "load_documents", "render",
    "validate_schemas", "cmd_site", "cmd_secret", "cmd_render", "cmd_check", "cmd_lint", "cmd_probe", "add_k8s_commands", "main",
]


def cmd_site(args) -> int:
    try:
        spec = _site_spec(args)
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
    print(f"wrote {shown}" + (" (self-contained: its own copy of the base)" if (target / "base").is_dir() else ""))
    print("next, at the site:")
    print(f"  ktfed pki issue --dir PKI --role participant --name {spec.name}   # at the federation's CA")
    print(f"  kubectl create namespace {spec.namespace}")
    print(f"  ktfed k8s secret --pki PKI --name {spec.name} --namespace {spec.namespace} | kubectl apply -f -")
    print(f"  ktfed k8s check {shown}")
    print(f"  kubectl apply -k {shown}")
    return 0


def _site_spec(args) -> SiteSpec:
    return SiteSpec(name=args.name, coordinator_host=args.coordinator_host, coordinator_port=args.coordinator_port,
                    coordinator_cidrs=tuple(args.coordinator_cidr or ()),
                    coordinator_namespace=args.coordinator_namespace, gpu=args.gpu, gpus=args.gpus,
                    namespace=args.namespace, registry=args.registry, tag=args.tag,
                    dns_namespace=args.dns_namespace, dns_labels=tuple(_label(t) for t in args.dns_label or ())
                    or DEFAULT_DNS_LABELS)


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise K8sError(f"--dns-label {text!r}: give KEY=VALUE")
    return key, value


def cmd_secret(args) -> int:
    from security.files import write_private

    from .secret import secret_manifests

    try:
        text, role = secret_manifests(Path(args.pki), args.name, args.namespace)
    except K8sError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        write_private(args.out, text.encode())
        print(f"wrote {args.out} (0600; {role} Secret{' and CRL ConfigMap' if role == 'coordinator' else ''}): "
              f"kubectl apply -f {args.out}, then delete the file")
    else:
        sys.stdout.write(text)
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
    root = Path(args.root) if args.root else (Path("k8s") if (Path("k8s") / "overlays").is_dir() else K8S_ROOT)
    overlays = [Path(o) for o in args.overlays] or find_overlays(root)
    if not overlays:
        print(f"error: no overlay (kustomization.yaml) under {root.absolute() / 'overlays'}: give OVERLAY folders",
              file=sys.stderr)
        return 2
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
    p.add_argument("--dns-namespace", default=DEFAULT_DNS_NAMESPACE,
                   help="namespace of the cluster's DNS pods, for the egress rule (default kube-system)")
    p.add_argument("--dns-label", action="append", metavar="KEY=VALUE",
                   help="a label of the cluster's DNS pods (repeatable; default k8s-app=kube-dns)")
    p.add_argument("--out", default="k8s/overlays/sites",
                   help="folder of site overlays; outside a k8s folder with the base, the overlay gets "
                        "its own copy of the base (self-contained)")
    p.add_argument("--base", help="the participant base (default: found above --out)")
    p.add_argument("--force", action="store_true", help="overwrite an existing overlay")
    p.set_defaults(func=cmd_site)

    p = sub.add_parser("secret", help="the TLS Secret (and the coordinator's CRL ConfigMap) from a PKI folder, "
                                      "as YAML for `kubectl apply -f -`")
    p.add_argument("--pki", required=True, help="the folder made by `ktfed pki init` (or a site's copy: ca.crt, "
                                                "issued/NAME.crt, issued/NAME.key)")
    p.add_argument("--name", required=True, help="the certificate's name: the coordinator's, or the site's")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--out", help="write to this file (0600) instead of stdout")
    p.set_defaults(func=cmd_secret)

    p = sub.add_parser("render", help="print an overlay's manifests (kubectl kustomize)")
    p.add_argument("overlay")
    p.add_argument("--validate", action="store_true", help="check schemas and rules first")
    p.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("check", help="render and validate overlays (all under ROOT/overlays by default)")
    p.add_argument("overlays", nargs="*")
    p.add_argument("--root", help="k8s folder whose overlays/ to check (default: ./k8s when it has overlays, "
                                  "else this installation's)")
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
