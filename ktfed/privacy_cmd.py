"""`ktfed privacy ledger|plan`: a site's privacy ledger; the noise a budget needs.

Standard library only at import: the CLI builds its parser on every invocation."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ktfed.cli_args import positive_float
from ktfed.exits import CLIError


def register(subparsers) -> None:
    p = subparsers.add_parser("privacy", help="differential privacy: a site's ledger, planning a budget")
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
    c.add_argument("--epsilon", type=positive_float, required=True)
    c.add_argument("--delta", type=float, default=None,
                   help="default: the run's privacy.delta with --config, else 1 / (10 N)")
    c.add_argument("--config", metavar="FILE", help="the run configuration: its privacy.delta is the default δ")
    c.add_argument("--accountant", default="prv", choices=["prv", "rdp"])
    c.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_privacy)


def cmd_privacy(args) -> int:
    if args.privacy_command == "ledger":
        from security.dp.ledger import LEDGER_FILE, PrivacyLedger

        path = Path(args.state) / LEDGER_FILE
        if not path.is_file():
            print(f"error: no privacy ledger at {path} (give the site's --state folder)", file=sys.stderr)
            return 2
        _check_ledger_site(path, args.site)
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

    delta = args.delta
    if delta is None and args.config:
        from kt_core.config import ConfigError, load_file

        try:
            delta = load_file(Path(args.config), os.environ).privacy.delta
        except ConfigError as err:
            raise CLIError(f"invalid config: {err}") from None
    try:
        result = plan(samples=args.samples, batch=args.batch, rounds=args.rounds, epochs=args.epochs,
                      epsilon=args.epsilon, delta=delta, accountant=args.accountant)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else result["text"])
    return 0


def _check_ledger_site(path: Path, site: str) -> None:
    """A ledger holds one site's rows: asking it for another site's is a wrong folder or name,
    not an empty history."""
    import sqlite3

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        sites = sorted({row[0] for table in ("entries", "declines")
                        for row in db.execute(f"SELECT DISTINCT site FROM {table}")})  # noqa: S608 - fixed names
    except sqlite3.Error as err:
        raise CLIError(f"{path}: not a privacy ledger ({err})") from None
    finally:
        db.close()
    if sites and site not in sites:
        raise CLIError(f"the ledger at {path} is {', '.join(sites)}'s, not {site}'s: give --site "
                       f"{sites[0]} or that site's own --state folder")
