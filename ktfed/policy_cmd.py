"""`ktfed participant policy check FILE` and `ktfed participant policy explain --coordinator ADDR`.

check: validate a site policy file field by field (exit 2 naming the file and the field) and
print the rules it holds with its digest. explain: join the coordinator as this site, read the
run config and factor manifest it announces, leave at once, and say rule by rule whether this
site would take part (exit 0: it would, 1: it would decline, 2: a bad policy file).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ktfed.exits import CLIError


def register(participant_subparsers) -> argparse.ArgumentParser:
    from ktfed.cli import _add_tls_args

    p = participant_subparsers.add_parser("policy", help="check a site policy, or explain a coordinator's run by it")
    sub = p.add_subparsers(dest="policy_command", required=True)
    check = sub.add_parser("check", help="validate a site policy file and print its rules")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--json", action="store_true", help="the validated policy as JSON")
    check.set_defaults(func=cmd_policy)
    explain = sub.add_parser("explain", help="would this site take part in the coordinator's run?")
    explain.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    explain.add_argument("--site", required=True, help="this site's name (its certificate's subject)")
    explain.add_argument("--policy", metavar="FILE", help="the site policy (default: the built-in default)")
    explain.add_argument("--state", default="participant-state", help="the site's folder (its run history)")
    _add_tls_args(explain)
    explain.set_defaults(func=cmd_policy)
    return p


def add_policy_argument(parser: argparse.ArgumentParser) -> None:
    """`--policy FILE` of `ktfed participant run`."""
    parser.add_argument("--policy", metavar="FILE", default=None,
                        help="this site's policy (TOML): what it agrees to whatever the run config says "
                             "(default: the built-in safe default, README 'Site policy')")


def load_or_exit(path: str | None):
    from kt_core.config_file import ConfigError
    from participant import policy as site_policy

    try:
        return site_policy.load(path) if path else site_policy.SitePolicy()
    except ConfigError as err:
        raise CLIError(str(err)) from None


def cmd_policy(args) -> int:
    if args.policy_command == "check":
        return check(args.file, as_json=args.json)
    from ktfed.cli import _tls
    return explain(args.coordinator, args.site, _tls(args, args.site), args.policy, Path(args.state),
                   insecure=args.insecure)


def check(path: str, as_json: bool = False) -> int:
    policy = load_or_exit(path)
    if as_json:
        print(json.dumps({"file": path, "sha256": policy.digest(), "policy": json.loads(policy.to_json())}, indent=2))
        return 0
    print(f"{path}: a valid site policy (sha256 {policy.digest()})")
    for section, rules in json.loads(policy.to_json()).items():
        for name, value in rules.items():
            print(f"  {section}.{name} = {json.dumps(value)}")
    return 0


def explain(coordinator: str, site: str, tls, policy_path: str | None, state: Path, *, insecure: bool = False,
            out=None) -> int:
    import grpc

    from kt_core.config import ConfigError, RunConfig
    from kt_core.wire import convert, transport
    from kt_core.wire import federation_pb2 as pb
    from kt_core.wire.federation_pb2_grpc import ParticipantServiceStub
    from participant import policy as site_policy
    from participant.site_run import AgentSettings, join_violations

    out = out or sys.stdout
    policy = load_or_exit(policy_path)
    settings = AgentSettings(site=site, coordinator=coordinator, tls=tls, state_dir=state, insecure=insecure)
    try:
        violations = site_policy.check_coordinator(policy, coordinator, tls)
        with transport.open_channel(coordinator, tls, insecure=insecure) as channel:
            stub = ParticipantServiceStub(channel)
            reply = stub.Join(pb.JoinRequest(header=convert.header(site_id=site)), timeout=30)
            stub.Leave(pb.LeaveRequest(header=convert.header(reply.header.run_id, site_id=site),
                                       reason="policy explain"), timeout=10)
        config = RunConfig.from_json(reply.run_config_json)
    except grpc.RpcError as err:
        raise CLIError(f"{coordinator}: {err.code().name}: {err.details()}", code=1) from None
    except (OSError, ConfigError) as err:
        raise CLIError(f"{coordinator}: {err}", code=1) from None
    violations += join_violations(settings, policy, config, reply)
    broken = {v.rule: v for v in violations}
    print(f"run {reply.header.run_id} at {coordinator}, judged by {policy.source} (sha256 {policy.digest()[:16]}):",
          file=out)
    for section, rules in json.loads(policy.to_json()).items():
        for name in rules:
            rule = f"{section}.{name}"
            verdict = f"REFUSED: {broken[rule].detail}" if rule in broken else "ok"
            print(f"  {rule:34} {verdict}", file=out)
    if violations:
        print(f"{site} would decline this run ({len(broken)} rules broken)", file=out)
        return 1
    print(f"{site} would take part in this run", file=out)
    return 0


def demo_policy(task: str, secure: bool, dp: bool | None = None) -> str:
    """The policy `ktfed demo` gives each site: factorized updates only, secure aggregation when
    the demo runs it, and record-level DP with a bounded epsilon when `dp` (by default for the
    image task)."""
    text = "# Written by `ktfed demo`: what each site agrees to (README \"Site policy\").\n" \
           "[model]\nadapters = [\"waffle\", \"lora\", \"ffa_lora\"]\n"
    if secure:
        text += "[secagg]\nrequired = true\nmin_sites = 2\n"
    if task == "image" if dp is None else dp:
        text += "[privacy]\nrequired = true\nlevels = [\"record\"]\nmax_epsilon_per_run = 10.0\n"
    return text


def policy_held(state_dir: Path, run_id: str) -> tuple[bool, str]:
    """(held, one line) from a site's audit log: the policy digest it joined `run_id` under, and
    whether it refused anything of that run by a policy rule."""
    digest, refused = "", []
    for path in sorted((Path(state_dir) / "audit").glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            body = entry.get("body") or {}
            if body.get("run") != run_id:
                continue
            if entry.get("kind") == "config":
                digest = body.get("policy_sha256", "")
            elif entry.get("kind") == "refusal" and str(body.get("reason", "")).startswith("site policy "):
                refused.append(body["reason"].removeprefix("site policy "))
    if not digest:
        return False, "no site policy recorded for this run"
    if refused:
        return False, f"policy {digest[:12]} refused: {', '.join(sorted(set(refused)))}"
    return True, f"policy {digest[:12]} held"
