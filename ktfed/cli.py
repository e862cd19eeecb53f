"""The `ktfed` command line: one entry point for operators, sites and the demo.

    ktfed pki init|issue|revoke          the federation's certificates
    ktfed coordinator serve              run the coordinator service
    ktfed participant run                run a site's participant agent
    ktfed run start|status|stop          operate runs on a coordinator
    ktfed config check FILE              validate a run configuration
    ktfed privacy ledger|plan            a site's privacy ledger; plan a privacy budget
    ktfed demo                           a whole federation on this machine
    ktfed audit verify|report|attack     check audit logs offline; the auditor's report; leakage tests
    ktfed pretrain --config FILE         pretrain the VLN backbone the coordinator hosts
    ktfed participant distill            distill a site's adapted model into a small local student
    ktfed simulate --participants N      N virtual participants in one process, no sockets
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _setup_logging(level: str, log_file: str | None, fmt: str = "text") -> None:
    from ktfed.logs import setup_logging

    setup_logging(level, log_file, fmt)


def _tls(args, name: str):
    from kt_core.wire.transport import TLSFiles

    if args.insecure:
        return None
    if args.cert or args.key or args.ca:
        if not (args.cert and args.key and args.ca):
            raise SystemExit("error: --cert, --key and --ca go together")
        return TLSFiles(Path(args.ca), Path(args.cert), Path(args.key))
    if not args.pki:
        raise SystemExit("error: give --pki DIR (or --ca/--cert/--key); plaintext needs --insecure")
    return TLSFiles.from_pki(Path(args.pki), name)


def _add_tls_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pki", help="PKI folder made by `ktfed pki` (uses ca.crt and issued/NAME.*)")
    parser.add_argument("--ca", help="CA certificate (instead of --pki)")
    parser.add_argument("--cert", help="this process's certificate (instead of --pki)")
    parser.add_argument("--key", help="this process's private key (instead of --pki)")
    parser.add_argument("--insecure", action="store_true", help="plaintext, no authentication: local debugging only")


# -- pki ----------------------------------------------------------------------------------------

def cmd_pki(args) -> int:
    from security.pki import PKIError, init_ca, issue, revoke

    pki_dir = Path(args.dir)
    try:
        if args.pki_command == "init":
            path = init_ca(pki_dir, force=args.force)
            print(f"federation CA written to {path}")
        elif args.pki_command == "issue":
            cert = issue(pki_dir, args.name, args.role, days=args.days, sans=args.san or ())
            print(f"issued {cert.role} certificate for {cert.name}: {cert.cert_path} "
                  f"(key {cert.key_path}, serial {cert.serial:x}, sha256 {cert.fingerprint})")
        elif args.pki_command == "revoke":
            serials = revoke(pki_dir, args.name, serial=args.serial)
            print(f"revoked {args.name}: serial(s) {', '.join(f'{s:x}' for s in serials)}; CRL updated")
    except PKIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# -- coordinator --------------------------------------------------------------------------------

def cmd_coordinator(args) -> int:
    from coordinator.server import CoordinatorServer, ServerSettings
    from coordinator.store import CorruptStateError
    from kt_core.config import ConfigError, load_file

    import torch

    _setup_logging(args.log_level, args.log_file, args.log_format)
    torch.set_num_threads(1)  # the coordinator only builds the initial model; keep the cores for sites
    log = logging.getLogger("ktfed.coordinator")
    try:
        config = load_file(Path(args.config), os.environ) if args.config else None
    except ConfigError as err:
        print(f"error: invalid config: {err}", file=sys.stderr)
        return 2
    tls = _tls(args, args.name)
    crl = Path(args.crl) if args.crl else (Path(args.pki) / "crl.pem" if args.pki else None)
    try:
        server = CoordinatorServer(ServerSettings(args.listen, Path(args.state), tls, crl, args.insecure,
                                                  metrics_listen=args.metrics_listen, audit=not args.no_audit))
        server.start(config)
    except CorruptStateError as err:
        log.error("refusing to start: %s", err)
        print(f"error: refusing to start: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        log.error("cannot start: %s", err)
        print(f"error: cannot start the coordinator: {err}", file=sys.stderr)
        return 2
    server.wait()
    return 0


# -- participant --------------------------------------------------------------------------------

def cmd_participant(args) -> int:
    import torch

    from participant.agent import AgentSettings, ParticipantAgent

    _setup_logging(args.log_level, args.log_file, args.log_format)
    torch.set_num_threads(args.threads)
    agent = ParticipantAgent(AgentSettings(
        site=args.site, coordinator=args.coordinator, tls=_tls(args, args.site), state_dir=Path(args.state),
        data_root=Path(args.data_root) if args.data_root else None, insecure=args.insecure,
        backoff_max_s=args.backoff_max, epsilon_budget=args.epsilon_budget, metrics_listen=args.metrics_listen,
        audit=not args.no_audit, coordinator_name=args.coordinator_name))
    import signal

    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    try:
        return agent.run()
    except (ValueError, RuntimeError) as err:
        logging.getLogger("ktfed.participant").error("%s: %s", args.site, err)
        print(f"error: {err}", file=sys.stderr)
        return 2


# -- operator -----------------------------------------------------------------------------------

def cmd_run(args) -> int:
    import grpc

    from ktfed.operator import OperatorClient, format_status
    from kt_core.config import ConfigError, load_file

    client = OperatorClient(args.coordinator, _tls(args, args.name), insecure=args.insecure)
    try:
        if args.run_command == "start":
            try:
                load_file(Path(args.config))  # fail here, naming the field, before any network call
            except ConfigError as err:
                print(f"error: invalid config: {err}", file=sys.stderr)
                return 2
            status = client.start(Path(args.config).read_text())
        elif args.run_command == "status":
            status = client.status(args.run_id or "")
        else:
            status = client.stop(args.run_id, args.reason)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(format_status(status), indent=2) if args.json else format_status(status, text=True))
    return 0


def cmd_status(args) -> int:
    """One look for operators: is the coordinator healthy, and where is its run."""
    import grpc

    from ktfed.operator import OperatorClient, format_status

    client = OperatorClient(args.coordinator, _tls(args, args.name), insecure=args.insecure, timeout=10)
    try:
        serving = client.serving()
        print(f"coordinator {args.coordinator}: {'SERVING' if serving else 'NOT SERVING or unreachable'}")
        try:
            status = client.status()
        except grpc.RpcError as err:
            print(f"run: {err.code().name}: {err.details()}")
            return 1
        print(format_status(status, text=True))
        return 0 if serving else 1
    finally:
        client.close()


def cmd_config(args) -> int:
    from kt_core.config import ConfigError, load_file

    from coordinator.coordinator import host_backbone, initial_state, shared_specs
    from coordinator.secagg_round import check_config
    from kt_core.tasks import check_levels

    try:
        config = load_file(Path(args.file), os.environ).resolved()
        check_levels(config)
        config, _ = host_backbone(config)
        check_config(config, shared_specs(initial_state(config)[0]))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(json.loads(config.to_json()), indent=2))
    return 0


def cmd_privacy(args) -> int:
    if args.privacy_command == "ledger":
        from security.dp.ledger import LEDGER_FILE, PrivacyLedger

        path = Path(args.state) / LEDGER_FILE
        if not path.is_file():
            print(f"error: no privacy ledger at {path} (give the site's --state folder)", file=sys.stderr)
            return 2
        ledger = PrivacyLedger(path, args.site)
        try:
            if args.json:
                print(json.dumps({"site": args.site, "path": str(path),
                                  "entries": [e.to_dict() for e in ledger.entries()],
                                  "declines": ledger.declines()}, indent=2))
            else:
                print(ledger.table())
        finally:
            ledger.close()
        return 0
    from ktfed.privacy_plan import PlanError, plan

    try:
        result = plan(samples=args.samples, batch=args.batch, rounds=args.rounds, epochs=args.epochs,
                      epsilon=args.epsilon, delta=args.delta, accountant=args.accountant)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else result["text"])
    return 0


def cmd_demo(args) -> int:
    from ktfed.launcher import DemoSettings, run_demo

    return run_demo(DemoSettings(workdir=Path(args.workdir), rounds=args.rounds, mode=args.mode,
                                 sites=args.sites, port=args.port, keep=args.keep, secagg=not args.no_secagg,
                                 task=args.task))


# -- parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ktfed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    pki = sub.add_parser("pki", help="the federation's certificate authority")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True)
    p = pki_sub.add_parser("init", help="create the federation CA")
    p.add_argument("--dir", default="pki")
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p = pki_sub.add_parser("issue", help="issue a certificate")
    p.add_argument("--dir", default="pki")
    p.add_argument("--role", required=True, choices=["participant", "coordinator", "operator"])
    p.add_argument("--name", required=True)
    p.add_argument("--san", action="append", help="extra DNS name or IP (coordinator certificates)")
    p.add_argument("--days", type=int, default=365)
    p = pki_sub.add_parser("revoke", help="revoke every certificate of NAME (or one --serial) and update the CRL")
    p.add_argument("--dir", default="pki")
    p.add_argument("--serial", type=_hex_serial, help="revoke only this certificate (hex serial, e.g. after rotation)")
    p.add_argument("name")
    pki.set_defaults(func=cmd_pki)

    coord = sub.add_parser("coordinator", help="the coordinator service")
    coord_sub = coord.add_subparsers(dest="coordinator_command", required=True)
    p = coord_sub.add_parser("serve", help="serve participants and operators")
    p.add_argument("--listen", default=DEFAULT_ADDRESS)
    p.add_argument("--state", default="coordinator-state", help="folder for SQLite and state files")
    p.add_argument("--name", default="coordinator", help="certificate name under --pki")
    p.add_argument("--config", help="run config (TOML) to start if no run is unfinished")
    p.add_argument("--crl", help="revocation list (default: PKI/crl.pem)")
    p.add_argument("--no-audit", action="store_true",
                   help="keep no audit log (STATE/audit): only to measure its overhead")
    _add_tls_args(p)
    _add_log_args(p)
    coord.set_defaults(func=cmd_coordinator)

    part = sub.add_parser("participant", help="a site's participant agent")
    part_sub = part.add_subparsers(dest="participant_command", required=True)
    p = part_sub.add_parser("run", help="join the federation and train on each task")
    p.add_argument("--site", required=True, help="this site's name (its certificate's subject)")
    p.add_argument("--coordinator", default=DEFAULT_ADDRESS)
    p.add_argument("--state", default="participant-state", help="site-local folder (private factors)")
    p.add_argument("--data-root", help="folder of the data set files (default: the system's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--backoff-max", type=float, default=5.0, help="cap of the reconnect backoff (s)")
    p.add_argument("--epsilon-budget", type=_positive_float, default=None,
                   help="this site's own privacy budget (epsilon); the stricter of it and the run's wins")
    p.add_argument("--coordinator-name", default="coordinator",
                   help="the coordinator's certificate name (whose audit head this site countersigns)")
    p.add_argument("--no-audit", action="store_true",
                   help="keep no audit log (STATE/audit): only to measure its overhead")
    _add_tls_args(p)
    _add_log_args(p)
    part.set_defaults(func=cmd_participant)
    from ktfed.distill_cmd import register as add_distill_command
    add_distill_command(part_sub)

    run = sub.add_parser("run", help="operate runs on a coordinator")
    run_sub = run.add_subparsers(dest="run_command", required=True)
    for name, text in (("start", "start a run"), ("status", "show a run"), ("stop", "stop a run")):
        p = run_sub.add_parser(name, help=text)
        p.add_argument("--coordinator", default=DEFAULT_ADDRESS)
        p.add_argument("--name", default="operator", help="operator certificate name under --pki")
        p.add_argument("--json", action="store_true")
        _add_tls_args(p)
        if name == "start":
            p.add_argument("--config", required=True)
        elif name == "status":
            p.add_argument("--run-id")
        else:
            p.add_argument("--run-id", required=True)
            p.add_argument("--reason", default="stopped by operator")
    run.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="the coordinator's health, its run and its participants")
    p.add_argument("--coordinator", default=DEFAULT_ADDRESS)
    p.add_argument("--name", default="operator", help="operator certificate name under --pki")
    _add_tls_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("config", help="validate configuration files")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    c = config_sub.add_parser("check", help="validate a run config and print it resolved")
    c.add_argument("file")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("privacy", help="differential privacy: a site's ledger, planning a budget")
    privacy_sub = p.add_subparsers(dest="privacy_command", required=True)
    c = privacy_sub.add_parser("ledger", help="print a site's privacy ledger")
    c.add_argument("--site", required=True)
    c.add_argument("--state", default="participant-state", help="the site's state folder")
    c.add_argument("--json", action="store_true")
    c = privacy_sub.add_parser("plan", help="noise multiplier and expected accuracy cost for a budget")
    c.add_argument("--samples", type=int, required=True, help="records at the site (N)")
    c.add_argument("--batch", type=int, required=True, help="expected batch size")
    c.add_argument("--rounds", type=int, required=True)
    c.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    c.add_argument("--epsilon", type=_positive_float, required=True)
    c.add_argument("--delta", type=float, default=None, help="default: 1 / (10 N)")
    c.add_argument("--accountant", default="prv", choices=["prv", "rdp"])
    c.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_privacy)

    p = sub.add_parser("demo", help="a real federation on this machine (coordinator + sites as processes)")
    p.add_argument("--workdir", default="ktfed-demo")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--mode", default="waffle", choices=["waffle", "lora", "ffa_lora", "dense"])
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--keep", action="store_true", help="keep an earlier work folder's state")
    p.add_argument("--task", default="vln", choices=["vln", "image"],
                   help="vln: sites adapt the hosted, pretrained navigation backbone (built once, cached); "
                        "image: a quick MLP on Fashion-MNIST / digits")
    p.add_argument("--no-secagg", action="store_true",
                   help="plain (authenticated, encrypted) uploads instead of secure aggregation")
    p.set_defaults(func=cmd_demo)

    from ktfed.k8s import add_k8s_commands  # standard library only at import: cheap

    add_k8s_commands(sub)
    from ktfed.audit_cmd import register as add_audit_commands
    from ktfed.pretrain_cmd import register as add_pretrain_command
    from ktfed.simulate_cmd import register as add_simulate_command
    add_audit_commands(sub)
    add_pretrain_command(sub)
    add_simulate_command(sub)
    return parser


def _hex_serial(text: str) -> int:
    try:
        return int(text.lower().removeprefix("0x").replace(":", ""), 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a hexadecimal serial: {text!r}") from None


def _positive_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _add_log_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-file", help="write logs here instead of stderr")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one JSON object per line (time, level, logger, message, fields)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default)")


ENV_PREFIX = "KTFED_"
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def apply_env_defaults(parser: argparse.ArgumentParser, environ=os.environ) -> None:
    """Let every `--flag-name` of every command default to $KTFED_FLAG_NAME (containers configure
    services through the environment); a flag given on the command line still wins. A value that
    the flag would refuse is refused here too, naming the variable."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                apply_env_defaults(sub, environ)
            continue
        longs = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
        if not longs:
            continue
        var = ENV_PREFIX + longs[0][2:].replace("-", "_").upper()
        if var not in environ:
            continue
        raw = environ[var]
        if isinstance(action, argparse._StoreTrueAction):
            if raw.lower() not in TRUE | FALSE:
                parser.error(f"{var}={raw!r}: expected true or false")
            action.default = raw.lower() in TRUE
        elif action.nargs is None and not isinstance(action, argparse._AppendAction):
            if action.choices is not None and raw not in action.choices:
                parser.error(f"{var}={raw!r}: choose from {', '.join(map(str, action.choices))}")
            action.default = raw  # argparse applies the flag's type to a string default
            action.required = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    apply_env_defaults(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
