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
    ktfed task new|check                 scaffold a federation's own task; check it on a site's data
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from ktfed.cli_args import apply_env_defaults, hex_serial, host_port, int_between, positive_float, run_id, source
from ktfed.exits import CLIError, StopSignals, Stopped, guarded, signal_name, stop_code

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
            raise CLIError("--cert, --key and --ca go together")
        tls = TLSFiles(Path(args.ca), Path(args.cert), Path(args.key))
        hint = "check --ca, --cert and --key"
    elif not args.pki:
        raise CLIError("give --pki DIR (or --ca/--cert/--key); plaintext needs --insecure")
    else:
        tls = TLSFiles.from_pki(Path(args.pki), name)
        hint = (f"{source(args, 'pki', '--pki')} must be a folder made by `ktfed pki init` holding "
                f"issued/{name}.crt and .key (`ktfed pki issue --name {name}`)")
    missing = [str(p) for p in (tls.ca_cert, tls.cert, tls.key) if not Path(p).is_file()]
    if missing:
        raise CLIError(f"TLS material not found: {', '.join(missing)} ({hint})")
    unreadable = [str(p) for p in (tls.ca_cert, tls.cert, tls.key) if not os.access(p, os.R_OK)]
    if unreadable:
        raise CLIError(f"cannot read {', '.join(unreadable)}: permission denied")
    return tls


def _check_listen(args, dest: str, flag: str) -> None:
    """Refuse an address another process already listens on, naming the flag (or variable), before
    anything is started: gRPC's own failure names neither."""
    import socket

    address = getattr(args, dest, None)
    if not address:
        return
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            probe.bind((host, int(port)))
        except OSError as err:
            raise CLIError(f"{source(args, dest, flag)} {address}: cannot listen there: {err.strerror}"
                           + (" (another process holds the port)" if "in use" in str(err.strerror) else "")) from None


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
    # The CLI's own wording for the two mistakes a person makes first (the library's speaks of its API).
    if args.pki_command == "init" and not args.force and (pki_dir / "ca.key").exists():
        raise CLIError(f"a CA already exists in {pki_dir}; give --force to replace it (every certificate it "
                       "issued stops working)")
    if args.pki_command != "init" and not (pki_dir / "ca.key").is_file():
        raise CLIError(f"{pki_dir} holds no federation CA: run `ktfed pki init --dir {pki_dir}` first")
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
    from coordinator.core_log import CoreLogTap
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
    _check_listen(args, "listen", "--listen")
    _check_listen(args, "metrics_listen", "--metrics-listen")
    started = False
    signals = StopSignals(lambda: None, interruptible=lambda: not started)
    server = tap = None
    with signals:
        try:
            server = CoordinatorServer(ServerSettings(args.listen, Path(args.state), tls, crl, args.insecure,
                                                      metrics_listen=args.metrics_listen, audit=not args.no_audit,
                                                      max_concurrent_rpcs=args.max_concurrent_rpcs,
                                                      abandon_run=args.abandon_run,
                                                      **({"max_workers": args.max_workers} if args.max_workers else {})))
            # gRPC's core reports a failed TLS handshake only on stderr: the tap records it
            tap = CoreLogTap(server.record_handshake_failure)
            tap.start()
            server.start(config)
            started = True
            while signals.signum is None:  # the handler only notes the signal once the run is served
                time.sleep(0.2)
        except CorruptStateError as err:
            log.error("refusing to start: %s", err)
            raise CLIError(f"refusing to start: {err}") from None
        except (OSError, ValueError) as err:
            log.error("cannot start: %s", err)
            raise CLIError(f"cannot start the coordinator: {err}") from None
        finally:
            if server is not None:
                server.stop()
            if tap is not None:
                tap.stop()
    log.info("stopped by %s: the round in progress was abandoned; the next start resumes at the last "
             "committed round", signal_name(signals.signum))
    return stop_code(signals.signum)


# -- participant --------------------------------------------------------------------------------

def _check_site_data(path: str) -> None:
    """A bad site data file: one line naming it and the field, before any connection (the data
    themselves are read and checked at join, when the run names the task they are for)."""
    from kt_core.config_file import ConfigError
    from kt_core.site_data import read_config

    try:
        read_config(Path(path))
    except ConfigError as err:
        raise CLIError(str(err)) from None


def cmd_participant(args) -> int:
    import torch

    from participant.agent import AgentSettings, ParticipantAgent

    _setup_logging(args.log_level, args.log_file, args.log_format)
    torch.set_num_threads(args.threads)
    _check_listen(args, "metrics_listen", "--metrics-listen")
    if args.policy:
        from ktfed.policy_cmd import load_or_exit

        load_or_exit(args.policy)  # a bad policy file: one line naming it and the field, before any connection
    if args.site_data:
        _check_site_data(args.site_data)
    agent = ParticipantAgent(AgentSettings(
        site=args.site, coordinator=args.coordinator, tls=_tls(args, args.site), state_dir=Path(args.state),
        data_root=Path(args.data_root) if args.data_root else None, insecure=args.insecure,
        backoff_max_s=args.backoff_max, epsilon_budget=args.epsilon_budget, metrics_listen=args.metrics_listen,
        audit=not args.no_audit, coordinator_name=args.coordinator_name,
        policy_path=Path(args.policy) if args.policy else None,
        site_data=Path(args.site_data) if args.site_data else None))
    log = logging.getLogger("ktfed.participant")
    # Mid-round the stop waits for the round's end, so its ledger entry and private factors are whole.
    signals = StopSignals(agent.stop, interruptible=lambda: agent.status != "training")
    try:
        with signals:
            code = agent.run()
    except Stopped:
        code = None
    except (ValueError, RuntimeError) as err:
        log.error("%s: %s", args.site, err)
        raise CLIError(str(err)) from None
    if signals.signum is None:
        if code in _AGENT_EXITS:  # the agent logged why; with --log-file the terminal must hear of it too
            print(f"error: {args.site}: {_AGENT_EXITS[code].format(state=args.state, site=args.site)} "
                  f"(exit {code}; the log says more)", file=sys.stderr)
        return code
    message = (f"{args.site}: stopped by {signal_name(signals.signum)}; its ledger and private factors are on disk, "
               "and the next start rejoins the run")
    log.info(message)
    if args.log_file:
        print(message, file=sys.stderr)
    return stop_code(signals.signum)


_AGENT_EXITS = {
    3: "the coordinator refused this site's identity",
    4: "cannot open the site's audit log in {state}/audit: another agent holds this --state folder, or the "
       "certificate is not {site}'s",
}


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


def cmd_demo(args) -> int:
    from ktfed.launcher import DemoSettings, run_demo

    return run_demo(DemoSettings(workdir=Path(args.workdir), rounds=args.rounds, adapter=args.adapter,
                                 sites=args.sites, port=args.port, keep=args.keep, secagg=not args.no_secagg,
                                 task=args.task))


# -- parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ktfed", description=__doc__.splitlines()[0],
                                     epilog="exit codes: 0 done, 1 failed, 2 invalid input, 3 identity refused, "
                                            "4 state folder in use or certificate/name mismatch, 130 Ctrl-C")
    parser.add_argument("--version", action="version", version=f"ktfed {_version()}")
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
    p.add_argument("--serial", type=hex_serial, help="revoke only this certificate (hex serial, e.g. after rotation)")
    p.add_argument("name")
    pki.set_defaults(func=cmd_pki)

    _add_service_commands(sub)
    _add_operator_commands(sub)

    p = sub.add_parser("config", help="validate configuration files")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    c = config_sub.add_parser("check", help="validate a run config and print it resolved")
    c.add_argument("file")
    p.set_defaults(func=cmd_config)

    from ktfed.privacy_cmd import register as add_privacy_commands
    add_privacy_commands(sub)

    p = sub.add_parser("demo", help="a real federation on this machine (coordinator + sites as processes)")
    p.add_argument("--workdir", default="ktfed-demo")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--adapter", default="waffle", choices=["waffle", "lora", "ffa_lora", "dense"])
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
    from ktfed.task_cli import register as add_task_command
    add_task_command(sub)
    return parser


def _add_service_commands(sub) -> None:
    """`coordinator serve` and `participant run` (and `participant distill`)."""
    coord = sub.add_parser("coordinator", help="the coordinator service")
    coord_sub = coord.add_subparsers(dest="coordinator_command", required=True)
    p = coord_sub.add_parser("serve", help="serve participants and operators")
    p.add_argument("--listen", default=DEFAULT_ADDRESS, type=host_port, metavar="HOST:PORT",
                   help=f"address to serve participants and operators on (default {DEFAULT_ADDRESS}; "
                        "0.0.0.0:PORT for every interface)")
    p.add_argument("--state", default="coordinator-state", help="folder for SQLite and state files")
    p.add_argument("--name", default="coordinator", help="certificate name under --pki")
    p.add_argument("--config", help="run config (TOML) to start if no run is unfinished")
    p.add_argument("--crl", help="revocation list (default: PKI/crl.pem)")
    p.add_argument("--no-audit", action="store_true",
                   help="keep no audit log (STATE/audit): only to measure its overhead")
    p.add_argument("--max-workers", type=int_between(4, 10_000), default=None,
                   help="gRPC worker threads; every connected site's assignment stream holds one, so a run is "
                        "refused unless this is at least federation.max_sites + 32 (default: room for "
                        "the default federation.max_sites, 100)")
    p.add_argument("--abandon-run", metavar="RUN_ID", type=run_id, default=None,
                   help="mark the unfinished run RUN_ID stopped and seal its audit log instead of resuming it (e.g. "
                        "when the task it was started with is no longer installed); then start --config's run, if any")
    p.add_argument("--max-concurrent-rpcs", type=int_between(4, 100_000), default=None,
                   help="calls in progress at once, beyond which gRPC refuses a call itself; a run is refused "
                        "unless this is at least 2 x federation.max_sites + 32 (default: max workers + 100)")
    _add_tls_args(p)
    _add_log_args(p)
    coord.set_defaults(func=cmd_coordinator)

    part = sub.add_parser("participant", help="a site's participant agent")
    part_sub = part.add_subparsers(dest="participant_command", required=True)
    p = part_sub.add_parser("run", help="join the federation and train on each task")
    p.add_argument("--site", required=True, help="this site's name (its certificate's subject)")
    p.add_argument("--coordinator", default=DEFAULT_ADDRESS, type=host_port, metavar="HOST:PORT",
                   help=f"the coordinator's address (default {DEFAULT_ADDRESS})")
    p.add_argument("--state", default="participant-state", help="site-local folder (private factors)")
    p.add_argument("--data-root", help="folder of the data set files (default: the system's)")
    p.add_argument("--site-data", metavar="FILE",
                   help="this site's own data (TOML: [data] format, path, columns) for a run whose task is a "
                        "federation's own ([task] kind = \"python\"); it never leaves the site")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--backoff-max", type=float, default=5.0, help="cap of the reconnect backoff (s)")
    p.add_argument("--epsilon-budget", type=positive_float, default=None,
                   help="this site's own privacy budget (epsilon); the stricter of it and the run's wins")
    p.add_argument("--coordinator-name", default="coordinator",
                   help="the coordinator's certificate name (whose audit head this site countersigns)")
    p.add_argument("--no-audit", action="store_true",
                   help="keep no audit log (STATE/audit): only to measure its overhead")
    from ktfed.policy_cmd import add_policy_argument
    add_policy_argument(p)
    _add_tls_args(p)
    _add_log_args(p)
    part.set_defaults(func=cmd_participant)
    from ktfed.distill_cmd import register as add_distill_command
    add_distill_command(part_sub)
    from ktfed.policy_cmd import register as add_policy_command
    add_policy_command(part_sub)


def _add_operator_commands(sub) -> None:
    """`run start|status|stop` and `status`: the federation operator's client."""
    run = sub.add_parser("run", help="operate runs on a coordinator")
    run_sub = run.add_subparsers(dest="run_command", required=True)
    for name, text in (("start", "start a run"), ("status", "show a run"), ("stop", "stop a run")):
        p = run_sub.add_parser(name, help=text)
        p.add_argument("--coordinator", default=DEFAULT_ADDRESS, type=host_port, metavar="HOST:PORT",
                       help=f"the coordinator's address (default {DEFAULT_ADDRESS})")
        p.add_argument("--name", default="operator", help="operator certificate name under --pki")
        p.add_argument("--json", action="store_true")
        _add_tls_args(p)
        if name == "start":
            p.add_argument("--config", required=True, metavar="FILE",
                           help="run configuration (TOML; checked here first, see `ktfed config check`)")
        elif name == "status":
            p.add_argument("--run-id")
        else:
            p.add_argument("--run-id", required=True)
            p.add_argument("--reason", default="stopped by operator")
    run.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="the coordinator's health, its run and its participants")
    p.add_argument("--coordinator", default=DEFAULT_ADDRESS, type=host_port, metavar="HOST:PORT",
                   help=f"the coordinator's address (default {DEFAULT_ADDRESS})")
    p.add_argument("--name", default="operator", help="operator certificate name under --pki")
    _add_tls_args(p)
    p.set_defaults(func=cmd_status)


def _add_log_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-file", help="write logs here instead of stderr")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one JSON object per line (time, level, logger, message, fields)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", type=host_port,
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ktfed")
    except PackageNotFoundError:  # a checkout used without `pip install -e .`
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    apply_env_defaults(parser)
    args = parser.parse_args(argv)
    return guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
