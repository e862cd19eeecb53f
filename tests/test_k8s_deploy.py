"""Deploying from k8s/README.md alone: every command of its numbered steps that needs no cluster
or registry is run here, in order, as a person would (real `ktfed` and `kubectl` processes);
self-contained site overlays; the DNS selector; `ktfed k8s secret`."""
from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ktfed import k8s

REPO = Path(__file__).resolve().parent.parent
STEPS = REPO / "k8s" / "README.md"

needs_kubectl = pytest.mark.skipif(k8s.kustomize_command() is None or shutil.which("kubectl") is None,
                                   reason="kubectl is not installed: overlays cannot be rendered")


def ktfed(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ktfed", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=180)


def readme_steps() -> list[str]:
    """The command lines of the numbered steps, in order."""
    text = STEPS.read_text()
    section = text.split("## From an empty cluster to a running federation", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```\n(.*?)```", section, flags=re.S):
        commands += [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]
    return commands


def _validate_yaml(text: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = k8s.load_documents(text)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, k8s.KUBERNETES_VERSION, True)


def _run_step(command: str, cwd: Path) -> str:
    """Run one README command the way it can run without a cluster; returns how it was tested."""
    left, _, right = command.partition(" | ")
    argv = shlex.split(left)
    if argv[:2] == ["ktfed", "status"]:  # asks the running coordinator
        return "needs a cluster or a registry"
    if argv[0] == "ktfed":
        done = ktfed(*argv[1:], cwd=cwd)
        assert done.returncode == 0, (command, done.stderr)
        if right == "kubectl apply -f -":
            _validate_yaml(done.stdout)
            return "validated"
        return "ran"
    if argv[:2] == ["docker", "build"]:
        done = ktfed("k8s", "lint-dockerfile", argv[argv.index("-f") + 1], cwd=cwd)
        assert done.returncode == 0, (command, done.stderr)
        return "linted"
    if argv[:2] == ["kubectl", "create"]:
        done = subprocess.run([*argv, "--dry-run=client", "-o", "yaml"], cwd=cwd, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, (command, done.stderr)
        return "dry-run"
    if argv[:3] == ["kubectl", "apply", "-k"]:
        _validate_yaml(k8s.render(cwd / argv[3]))
        return "rendered"
    return "needs a cluster or a registry"


@needs_kubectl
def test_the_readme_steps_run_in_order(tmp_path):
    commands = readme_steps()
    assert commands[0].startswith("docker build") and any(c.startswith("ktfed status") for c in commands)
    # a copy of what a checkout holds for deployment, so the steps write nothing into this one
    shutil.copytree(REPO / "k8s", tmp_path / "k8s", ignore=shutil.ignore_patterns("hospital-3"))
    run_toml = tmp_path / "k8s" / "overlays" / "coordinator" / "run.toml"
    # step 3 of the README: the run lists the new site
    run_toml.write_text(run_toml.read_text().replace('sites = ["site-a", "site-b"]',
                                                     'sites = ["site-a", "site-b", "hospital-3"]'))
    how = {}
    for command in commands:
        how[command] = _run_step(command, tmp_path)
    untested = [c for c, h in how.items() if h == "needs a cluster or a registry"]
    assert all(c.split()[0] in ("docker", "kubectl", "ktfed") for c in untested), untested
    assert all(c.startswith(("docker push", "kubectl -n", "ktfed status")) for c in untested), untested
    assert sum(h != "needs a cluster or a registry" for h in how.values()) >= 15
    assert (tmp_path / "k8s" / "overlays" / "sites" / "hospital-3" / "kustomization.yaml").is_file()


@needs_kubectl
def test_a_site_overlay_outside_a_checkout_is_self_contained(tmp_path):
    elsewhere = tmp_path / "site-repo"
    elsewhere.mkdir()
    done = ktfed("k8s", "site", "hospital-9", "--coordinator-host", "203.0.113.10", "--dns-namespace", "dns",
                 "--dns-label", "app.kubernetes.io/name=coredns", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    overlay = elsewhere / "k8s" / "overlays" / "sites" / "hospital-9"
    text = (overlay / "kustomization.yaml").read_text()
    assert "  - base\n" in text and ".." not in text.split("resources:", 1)[1]
    assert (overlay / "base" / "deployment.yaml").is_file()
    # `ktfed k8s check` there checks that overlay (not the checkout's), and nothing else
    done = ktfed("k8s", "check", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["k8s/overlays/sites/hospital-9: ok"]
    moved = tmp_path / "moved"
    shutil.move(str(overlay), moved)  # whole where it was written: it renders wherever it goes
    docs = k8s.load_documents(k8s.render(moved))
    assert k8s.check_rules(docs) == []
    dns = next(d for d in docs if d["kind"] == "NetworkPolicy")["spec"]["egress"][0]["to"][0]
    assert dns == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dns"}},
                   "podSelector": {"matchLabels": {"app.kubernetes.io/name": "coredns"}}}
    assert "--dns-namespace dns --dns-label app.kubernetes.io/name=coredns" in (moved / "kustomization.yaml").read_text()


def test_check_with_nothing_to_check_says_so(tmp_path):
    (tmp_path / "k8s" / "overlays").mkdir(parents=True)
    done = ktfed("k8s", "check", "--root", str(tmp_path / "k8s"), cwd=tmp_path)
    assert done.returncode == 2 and "no overlay" in done.stderr


def test_the_secret_comes_from_the_pki_folder(tmp_path, pki_dir, capsys):
    assert k8s.main(["secret", "--pki", str(pki_dir), "--name", "site-a", "--namespace", "hospital"]) == 0
    docs = k8s.load_documents(capsys.readouterr().out)
    (secret,) = docs
    assert secret["kind"] == "Secret" and secret["metadata"] == {
        "name": "ktfed-participant-tls", "namespace": "hospital", "labels": {"app.kubernetes.io/part-of": "ktfed"}}
    files = {"ca.crt": pki_dir / "ca.crt", "tls.crt": pki_dir / "issued" / "site-a.crt",
             "tls.key": pki_dir / "issued" / "site-a.key"}
    assert {k: base64.b64decode(v) for k, v in secret["data"].items()} == {k: p.read_bytes() for k, p in files.items()}
    out = tmp_path / "coordinator-secret.yaml"
    assert k8s.main(["secret", "--pki", str(pki_dir), "--name", "coordinator", "--out", str(out)]) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s.load_documents(out.read_text())}
    assert kinds == {("Secret", "ktfed-coordinator-tls"), ("ConfigMap", "ktfed-crl")}
    crl = next(d for d in k8s.load_documents(out.read_text()) if d["kind"] == "ConfigMap")["data"]["crl.pem"]
    assert crl.strip() == (pki_dir / "crl.pem").read_text().strip()
    _validate_yaml(out.read_text())


def test_the_secret_refuses_what_a_pod_could_not_use(tmp_path, pki_dir, capsys):
    pki = tmp_path / "pki"
    shutil.copytree(pki_dir, pki)
    assert k8s.main(["secret", "--pki", str(pki), "--name", "nobody"]) == 2
    assert "issued/nobody.crt: no such file" in capsys.readouterr().err
    assert k8s.main(["secret", "--pki", str(pki), "--name", "operator"]) == 2
    assert "coordinator or participant" in capsys.readouterr().err
    shutil.copy(pki / "issued" / "site-b.key", pki / "issued" / "site-a.key")  # a key of another certificate
    assert k8s.main(["secret", "--pki", str(pki), "--name", "site-a"]) == 2
    assert "does not belong to its certificate" in capsys.readouterr().err
    shutil.copy(pki / "issued" / "site-b.crt", pki / "issued" / "site-a.crt")  # site-b's pair under site-a's name
    assert k8s.main(["secret", "--pki", str(pki), "--name", "site-a"]) == 2
    assert "is for ['site-b'], not 'site-a'" in capsys.readouterr().err
