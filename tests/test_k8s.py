"""The Kubernetes deployment: overlays render and validate offline, our own rules hold, a broken
manifest fails, site overlays are generated, the container files follow the image rules (the
probes: tests/test_k8s_probes.py; deploying from k8s/README.md: tests/test_k8s_deploy.py)."""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
from pathlib import Path

import pytest

from ktfed import k8s

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
IMAGES = K8S / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
EXPECTED_OVERLAYS = ["coordinator", "sites/site-a", "sites/site-b"]
COORD_HOST = "coordinator.ktfed.example.org"
COORD_CIDR = "203.0.113.10/32"
MONITORING_RULE = {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                   "ports": [{"port": 9090, "protocol": "TCP"}]}

needs_kubectl = pytest.mark.skipif(k8s.kustomize_command() is None,
                                   reason="kubectl (or kustomize) is not installed: overlays cannot be rendered")


def _kubernetes_validate():
    return pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed "
                               "(pip install kubernetes-validate): schemas cannot be checked")


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every committed overlay rendered once per session: relative name -> documents."""
    if k8s.kustomize_command() is None:
        pytest.skip("kubectl (or kustomize) is not installed: overlays cannot be rendered")
    pytest.importorskip("yaml", reason="PyYAML is not installed")
    out = {}
    for overlay in k8s.find_overlays(K8S):
        out[overlay.relative_to(K8S / "overlays").as_posix()] = k8s.load_documents(k8s.render(overlay))
    return out


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


def _copy_k8s(tmp_path: Path) -> Path:
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("images"))
    return root


# -- render + validate --------------------------------------------------------------------------

def test_the_committed_overlays_are_the_expected_ones(rendered):
    assert sorted(rendered) == EXPECTED_OVERLAYS


@pytest.mark.parametrize("overlay", EXPECTED_OVERLAYS)
def test_every_overlay_validates_against_the_pinned_kubernetes_schema(rendered, overlay):
    _kubernetes_validate()
    docs = rendered[overlay]
    assert docs
    assert k8s.validate_schemas(docs, k8s.KUBERNETES_VERSION, strict=True) == []


@pytest.mark.parametrize("overlay", EXPECTED_OVERLAYS)
def test_every_overlay_follows_our_rules(rendered, overlay):
    assert k8s.check_rules(rendered[overlay]) == []


def test_pinned_kubernetes_version_is_supported_offline():
    _kubernetes_validate()
    from kubernetes_validate.utils import all_versions, major_minor

    assert major_minor(k8s.KUBERNETES_VERSION) in {major_minor(v) for v in all_versions()}


@needs_kubectl
def test_a_wrongly_typed_field_makes_validation_fail(tmp_path):
    _kubernetes_validate()
    root = _copy_k8s(tmp_path)
    overlay = root / "overlays" / "coordinator"
    kustomization = overlay / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text() + (
        "  - target:\n      kind: StatefulSet\n      name: ktfed-coordinator\n"
        "    patch: |-\n      - op: replace\n        path: /spec/replicas\n        value: two\n"))
    docs = k8s.load_documents(k8s.render(overlay))
    assert _one(docs, "StatefulSet")["spec"]["replicas"] == "two"
    problems = k8s.validate_schemas(docs)
    assert len(problems) == 1 and "StatefulSet/ktfed-coordinator: spec.replicas" in problems[0], problems
    assert k8s.check_overlay(overlay)  # the command-level check fails too


def test_strict_validation_rejects_unknown_fields_and_unknown_kinds(rendered):
    _kubernetes_validate()
    docs = copy.deepcopy(rendered["sites/site-a"])
    deployment = _one(docs, "Deployment")
    _container(deployment)["imagePullPolice"] = "Always"  # a typo a lax schema would let through
    problems = k8s.validate_schemas(docs)
    assert any("imagePullPolice" in p for p in problems), problems
    bogus = {"apiVersion": "example.org/v1", "kind": "Unheard", "metadata": {"name": "x"}}
    assert any("Unheard" in p for p in k8s.validate_schemas([bogus]))


def _drop_probe(docs):
    del _container(_one(docs, "StatefulSet"))["readinessProbe"]


def _latest(docs):
    _container(_one(docs, "StatefulSet"))["image"] = "registry.example.org/ktfed/coordinator:latest"


def _untagged(docs):
    _container(_one(docs, "StatefulSet"))["image"] = "registry.example.org/ktfed/coordinator"


def _root(docs):
    spec = _one(docs, "StatefulSet")["spec"]["template"]["spec"]
    spec["securityContext"]["runAsUser"] = 0
    _container(_one(docs, "StatefulSet"))["securityContext"]["runAsUser"] = 0


def _writable_root(docs):
    _container(_one(docs, "StatefulSet"))["securityContext"]["readOnlyRootFilesystem"] = False


def _no_limits(docs):
    del _container(_one(docs, "StatefulSet"))["resources"]["limits"]


def _no_policy(docs):
    docs[:] = [d for d in docs if d["kind"] != "NetworkPolicy"]


def _baked_secret(docs):
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ktfed-coordinator-tls"},
                 "stringData": {"tls.key": "..."}})


def _unknown_secret(docs):
    for v in _one(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]:
        if v["name"] == "tls":
            v["secret"]["secretName"] = "ktfed-coordinatr-tls"


def _capabilities(docs):
    _container(_one(docs, "StatefulSet"))["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}


@pytest.mark.parametrize("mutate, expected", [
    (_drop_probe, "no readinessProbe"),
    (_latest, "'latest' tag"),
    (_untagged, "has no tag"),
    (_root, "runAsUser must be a non-zero numeric UID"),
    (_writable_root, "readOnlyRootFilesystem"),
    (_no_limits, "resources.limits.cpu not set"),
    (_no_policy, "no NetworkPolicy"),
    (_baked_secret, "a Secret is rendered from the repository"),
    (_unknown_secret, "'ktfed-coordinatr-tls'"),
    (_capabilities, "do not drop ALL"),
], ids=lambda v: getattr(v, "__name__", "")[:20])
def test_our_rules_catch_each_violation(rendered, mutate, expected):
    docs = copy.deepcopy(rendered["coordinator"])
    mutate(docs)
    problems = k8s.check_rules(docs)
    assert any(expected in p for p in problems), problems


# -- what the overlays contain ------------------------------------------------------------------

def test_coordinator_overlay(rendered):
    from kt_core.config import load_toml

    docs = rendered["coordinator"]
    sts = _one(docs, "StatefulSet", "ktfed-coordinator")
    spec = sts["spec"]
    assert spec["replicas"] == 1 and spec["serviceName"] == "ktfed-coordinator-headless"
    assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["state"]
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 30  # the coordinator persists on SIGTERM
    c = _container(sts)
    assert c["image"] == "registry.example.org/ktfed/coordinator:0.1.0"
    assert c["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert "--metrics-listen=0.0.0.0:9090" in c["args"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["state"]["mountPath"] == "/var/lib/ktfed/state"
    assert all(mounts[n].get("readOnly") for n in ("tls", "crl", "config"))
    assert all("subPath" not in m for m in c["volumeMounts"])  # updated CRLs must reach the pod
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = c[probe]["exec"]["command"]
        assert command[:5] == ["python", "-m", "ktfed.k8s", "probe", "grpc"]
    services = {s["metadata"]["name"]: s for s in docs if s["kind"] == "Service"}
    assert services["ktfed-coordinator"]["spec"]["type"] == "LoadBalancer"
    assert services["ktfed-coordinator-headless"]["spec"]["clusterIP"] == "None"
    metrics = services.pop("ktfed-coordinator-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"  # never on the LoadBalancer
    assert [(p["port"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [(9090, "metrics")]
    for s in services.values():
        assert [(p["port"], p["targetPort"]) for p in s["spec"]["ports"]] == [(50051, "grpc")]
    policy = _one(docs, "NetworkPolicy")["spec"]
    assert policy["ingress"] == [{"ports": [{"port": 50051, "protocol": "TCP"}]}, MONITORING_RULE]
    assert all(p["port"] == 53 for rule in policy["egress"] for p in rule["ports"])
    config_volume = next(v for v in pod["volumes"] if v["name"] == "config")
    config_map = _one(docs, "ConfigMap", config_volume["configMap"]["name"])
    run = load_toml(config_map["data"]["run.toml"], "run.toml")  # the committed run config is a valid one
    assert list(run.federation.sites) == ["site-a", "site-b"]
    assert run.data.dataset != "auto"
    assert {d["metadata"]["namespace"] for d in docs} == {"ktfed"}


@pytest.mark.parametrize("site, gpu", [("site-a", False), ("site-b", True)])
def test_site_overlays(rendered, site, gpu):
    docs = rendered[f"sites/{site}"]
    deployment = _one(docs, "Deployment", "ktfed-participant")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    c = _container(deployment)
    env = {e["name"]: e["valueFrom"]["configMapKeyRef"]["name"] for e in c["env"] if "valueFrom" in e}
    config = _one(docs, "ConfigMap", env["KTFED_SITE"])["data"]
    assert config == {"KTFED_SITE": site, "KTFED_COORDINATOR": f"{COORD_HOST}:50051"}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in deployment["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"state": "ktfed-participant-state", "data": "ktfed-participant-data"}
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"} == set(claims.values())
    assert next(m for m in c["volumeMounts"] if m["name"] == "data")["readOnly"] is True
    policy = _one(docs, "NetworkPolicy", "ktfed-participant")["spec"]
    assert policy["ingress"] == [MONITORING_RULE] and set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in c["ports"]
    coordinator_rule = [r for r in policy["egress"] if any("ipBlock" in t for t in r["to"])]
    assert coordinator_rule == [{"to": [{"ipBlock": {"cidr": COORD_CIDR}}],
                                 "ports": [{"port": 50051, "protocol": "TCP"}]}]
    assert len(policy["egress"]) == 2  # DNS + the coordinator, nothing else
    limits = c["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) is gpu
    assert c["image"].endswith("/participant-cuda:0.1.0" if gpu else "/participant:0.1.0")
    assert deployment["metadata"]["labels"]["ktfed.io/site"] == site


def test_container_arguments_are_ones_the_cli_accepts(rendered):
    """The manifests' args and the images' CMDs parse with the real `ktfed` parser, and every
    exec probe parses with the k8s command parser: a renamed flag breaks this test, not a pod."""
    from ktfed.cli import build_parser

    parser = build_parser()
    for name, docs in rendered.items():
        for doc in docs:
            pod = k8s._pod_spec(doc)
            if pod is None:
                continue
            for c in pod["containers"]:
                args = [a.replace("$(KTFED_SITE)", "site-a").replace("$(KTFED_COORDINATOR)", "h:1")
                        for a in c["args"]]
                parsed = parser.parse_args(args)
                assert parsed.command in ("coordinator", "participant"), name
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    command = c[probe]["exec"]["command"]
                    assert command[:3] == ["python", "-m", "ktfed.k8s"]
                    _k8s_parser().parse_args(["k8s", *command[3:]])
    for dockerfile in DOCKERFILES:
        for ins in k8s.parse_dockerfile(dockerfile.read_text()):
            if ins.keyword == "CMD" and "--help" not in ins.args:
                parser.parse_args(json.loads(ins.args))
            if ins.keyword == "HEALTHCHECK":
                command = json.loads(ins.args[ins.args.index("["):])
                _k8s_parser().parse_args(["k8s", *command[3:]])


def _k8s_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    k8s.add_k8s_commands(parser.add_subparsers(dest="command", required=True))
    return parser


# -- site generation ----------------------------------------------------------------------------

@pytest.mark.parametrize("site, extra", [("site-a", []), ("site-b", ["--gpu"])])
def test_committed_sites_are_what_the_generator_writes(tmp_path, site, extra):
    out = _copy_k8s(tmp_path) / "overlays" / "sites"
    shutil.rmtree(out / site)
    assert k8s.main(["site", site, "--coordinator-host", COORD_HOST, "--coordinator-cidr", COORD_CIDR,
                     "--out", str(out), *extra]) == 0
    committed = K8S / "overlays" / "sites" / site
    assert sorted(p.name for p in (out / site).iterdir()) == sorted(p.name for p in committed.iterdir())
    for path in committed.iterdir():
        assert (out / site / path.name).read_text() == path.read_text(), path.name


@needs_kubectl
def test_a_new_site_overlay_renders_and_validates(tmp_path, capsys):
    _kubernetes_validate()
    root = _copy_k8s(tmp_path)
    assert k8s.main(["site", "hospital-7", "--coordinator-host", "ktfed-coordinator.federation.svc",
                     "--coordinator-namespace", "federation", "--gpu", "--gpus", "2", "--tag", "1.2.3",
                     "--out", str(root / "overlays" / "sites")]) == 0
    assert "ktfed k8s secret --pki PKI --name hospital-7 --namespace ktfed | kubectl apply -f -" in capsys.readouterr().out
    overlay = root / "overlays" / "sites" / "hospital-7"
    assert k8s.check_overlay(overlay) == []
    docs = k8s.load_documents(k8s.render(overlay))
    c = _container(_one(docs, "Deployment"))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["image"] == "registry.example.org/ktfed/participant-cuda:1.2.3"
    egress = _one(docs, "NetworkPolicy")["spec"]["egress"][1]["to"][0]
    assert egress["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "federation"}
    # regenerating without --gpu drops the GPU patch
    assert k8s.main(["site", "hospital-7", "--coordinator-host", "10.0.0.5", "--force",
                     "--out", str(root / "overlays" / "sites")]) == 0
    assert not (overlay / "gpu.yaml").exists()
    assert "cidr: 10.0.0.5/32" in (overlay / "networkpolicy-egress.yaml").read_text()


@pytest.mark.parametrize("argv, message", [
    (["Site_A", "--coordinator-host", "10.0.0.1"], "site name 'Site_A'"),
    (["site-", "--coordinator-host", "10.0.0.1"], "site name 'site-'"),
    (["site-z", "--coordinator-host", "coord.example.org"], "give --coordinator-cidr"),
    (["site-z", "--coordinator-host", "10.0.0.1", "--coordinator-cidr", "10.0.0.1/8"], "--coordinator-cidr"),
    (["site-z", "--coordinator-host", "bad host!"], "not a DNS name or an IP"),
    (["site-z", "--coordinator-host", "10.0.0.1", "--tag", "latest"], "not 'latest'"),
    (["site-z", "--coordinator-host", "10.0.0.1", "--coordinator-port", "70000"], "1..65535"),
    (["site-a", "--coordinator-host", "10.0.0.1"], "exists: give --force"),
    (["site-z", "--coordinator-host", "10.0.0.1", "--dns-label", "novalue"], "give KEY=VALUE"),
    (["site-z", "--coordinator-host", "10.0.0.1", "--dns-label", "k8s-app=bad value"], "not a Kubernetes label"),
    (["site-z", "--coordinator-host", "10.0.0.1", "--dns-namespace", "Kube_System"], "--dns-namespace"),
])
def test_site_command_refuses_bad_input(tmp_path, capsys, argv, message):
    out = _copy_k8s(tmp_path) / "overlays" / "sites"
    assert k8s.main(["site", *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err


def test_add_k8s_commands_registers_the_group():
    args = _k8s_parser().parse_args(["k8s", "site", "s1", "--coordinator-host", "10.1.2.3", "--gpu"])
    assert args.func is k8s.cmd_site and args.gpu and args.out == "k8s/overlays/sites"


# -- container files ----------------------------------------------------------------------------

def test_the_container_files_exist():
    assert {p.name for p in DOCKERFILES} == {"coordinator.Dockerfile", "participant.Dockerfile",
                                             "participant-cuda.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_container_files_follow_the_image_rules(dockerfile):
    assert k8s.lint_dockerfile(dockerfile.read_text()) == []


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_torch_is_installed_first_and_pinned(dockerfile):
    installs = k8s.pip_installs(dockerfile.read_text())
    first = shlex.split(installs[0])
    assert first[:3] == ["pip", "install", "torch==2.13.0"], installs[0]  # torch alone, pinned, first
    cpu_index = ["--index-url", "https://download.pytorch.org/whl/cpu"]
    assert first[3:] == ([] if "cuda" in dockerfile.name else cpu_index), installs[0]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_container_files_copy_only_what_exists(dockerfile):
    for ins in k8s.parse_dockerfile(dockerfile.read_text()):
        if ins.keyword == "COPY" and "--from" not in ins.args:
            for source in ins.args.split()[:-1]:
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text()
    assert "**/*.key" in ignore and "**/pki" in ignore


GOOD = """FROM python:3.11.13-slim-bookworm
RUN pip install torch==2.13.0
USER 10001
HEALTHCHECK CMD ["true"]
CMD ["ktfed"]
"""


@pytest.mark.parametrize("text, expected", [
    (GOOD.replace("python:3.11.13-slim-bookworm", "python:latest"), "'latest' tag"),
    (GOOD.replace("python:3.11.13-slim-bookworm", "python"), "has no tag"),
    (GOOD.replace("FROM python:3.11.13-slim-bookworm", "ARG BASE\nFROM $BASE"), "not pinned"),
    (GOOD.replace("USER 10001\n", ""), "CMD before a non-root USER"),
    (GOOD.replace("USER 10001", "USER root"), "numeric UID"),
    (GOOD.replace("USER 10001", "USER 0:0"), "is root"),
    (GOOD.replace("USER 10001\n", "") + "USER 10001\n", "CMD before a non-root USER"),
    (GOOD + "USER 0\n", "does not run as a numeric non-root USER"),
    (GOOD.replace('HEALTHCHECK CMD ["true"]', "HEALTHCHECK NONE"), "no HEALTHCHECK"),
    (GOOD.replace('HEALTHCHECK CMD ["true"]\n', ""), "no HEALTHCHECK"),
    (GOOD + "COPY pki/ /etc/ktfed/pki/\n", "key or certificate material"),
    (GOOD + "COPY issued/site-a.key /k\n", "key or certificate material"),
    (GOOD + 'COPY ["ca.pem", "/etc/"]\n', "key or certificate material"),
    (GOOD + "COPY . /src\n", "whole build context"),
    (GOOD + "ADD https://example.org/x.tar.gz /x\n", "remote content"),
    (GOOD + "ENV API_KEY=abc\n", "ENV API_KEY"),
    (GOOD + "ENV DB_PASSWORD hunter2\n", "ENV DB_PASSWORD"),
    (GOOD + "ARG GITHUB_TOKEN\n", "ARG GITHUB_TOKEN"),
    ("ARG REGISTRY_PASSWORD=x\n" + GOOD, "ARG REGISTRY_PASSWORD"),
    (GOOD + 'ENV CA="-----BEGIN CERTIFICATE-----"\n', "PEM material"),
])
def test_the_dockerfile_lint_catches_each_violation(text, expected):
    assert k8s.lint_dockerfile(GOOD) == []
    problems = k8s.lint_dockerfile(text)
    assert any(expected in p for p in problems), problems


def test_the_dockerfile_lint_follows_stages_and_continuations():
    text = ("ARG PY=python:3.11.13-slim\nFROM ${PY} AS build\nRUN echo \\\n  # a comment\n  done\n"
            "FROM build AS run\nUSER 10001:10001\nHEALTHCHECK --interval=5s \\\n  CMD [\"true\"]\n"
            "FROM run\nENTRYPOINT [\"ktfed\"]\n")
    assert k8s.lint_dockerfile(text) == []
    assert [i.keyword for i in k8s.parse_dockerfile(text)] == [
        "ARG", "FROM", "RUN", "FROM", "USER", "HEALTHCHECK", "FROM", "ENTRYPOINT"]
