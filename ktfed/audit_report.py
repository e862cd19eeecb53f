"""The auditor's report: what a person who did not run the federation needs to judge it.

`write_report(result, out)` writes, from verified audit logs:

    out/index.html     one self-contained page (inline CSS, plots embedded as base64 PNG, no URLs)
    out/report.json    the same facts, machine-readable
    out/epsilon.png    cumulative epsilon per site and round
    out/bytes.png      bytes that crossed each boundary per round

Only entries that verified are reported; the verification result is at the top of the page.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import json
import re
from collections import defaultdict
from pathlib import Path

from ktfed.audit_policy import check_sites
from security.audit import VerifyResult, as_float
from security.audit.crosscheck import entry_run

THREAT_MODEL = [
    ("Who sees what",
     "Each site trains on its own data and sends only an update of the model's shared factors to the "
     "coordinator; raw records never leave a site. The factor selection of each site (WAFFLe's gates) "
     "stays at the site too, so the coordinator never holds any site's actual model."),
    ("What the coordinator is trusted with",
     "Nothing beyond running the protocol. It is assumed curious: it may study everything it receives. "
     "With secure aggregation on, it receives only masked updates and can unmask only their sum over at "
     "least t sites; it never sees one site's update. Without it, it sees each site's update."),
    ("What differential privacy promises",
     "With DP-SGD at a site, whatever anyone learns from that site's updates (coordinator, other sites, "
     "users of the final model) changes by at most a factor e^epsilon whether or not any single record "
     "was used, except with probability delta. Smaller epsilon is stronger; it adds up over rounds, and "
     "each site stops training when its own budget is spent."),
    ("What this audit log proves",
     "Every entry is signed with its producer's certificate (issued by the federation CA) and chained to "
     "the previous one, so an entry cannot be altered, removed, reordered or inserted without the "
     "verification naming it. Each round the sites countersign the coordinator's chain head and the "
     "coordinator keeps their countersignatures, so neither side can rewrite history that the other "
     "has committed to. Messages are logged at both ends with their SHA-256, size and tensor list, and "
     "must agree. When a run ends the coordinator seals it (a signed last entry) and every site "
     "countersigns the seal, so the end of the run cannot be cut or rewritten either."),
    ("What it does not prove",
     "A producer can still lie consistently in its own log about things nobody else observed before a "
     "peer committed to it. Strict verification fails when a site's log is missing, a run is unsealed, "
     "or an entry lies unpinned at the end of a log; the --partial reading only warns. The log records "
     "what the software reported; whether the "
     "mechanisms deliver the stated privacy is measured separately by `ktfed audit attack`. Revocation of "
     "certificates is not checked here, and entry times are the producers' own clocks."),
]


def _settled(rows: list[dict]) -> list[dict]:
    """A site's DP records, the last word on each ledger row: a row logged as spent after training
    and logged again as withheld when its update never left (security.dp.ledger) is shown once,
    withheld."""
    last: dict = {}
    for i, r in enumerate(rows):
        key = (str(r["run"]), r["ledger_seq"]) if r.get("ledger_seq") is not None else ("", i)
        last[key] = r
    return sorted(last.values(), key=lambda r: (str(r["run"]), r["round"] or 0))


def collect(result: VerifyResult) -> dict:
    """Everything the report shows, from the verified entries, as plain JSON-ready data."""
    logs = [v for v in result.logs if v.producer]
    by_producer = {v.producer: v for v in logs}
    configs, privacy, secagg, refusals, declines = [], defaultdict(list), [], [], []
    countersigns: dict[str, dict] = {}
    seals = {(v.producer, e.seq) for v in logs for e in v.entries if e.kind == "seal"}
    crossings: dict[tuple, dict] = {}
    per_round: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for v in logs:
        for e in v.entries:
            b = e.body
            if result.runs and entry_run(e) not in result.runs:
                continue
            if e.kind == "config":
                configs.append({"producer": v.producer, "seq": e.seq, "time": e.time, "run": b.get("run"),
                                "config_sha256": b.get("config_sha256"), "versions": b.get("versions", {}),
                                "git_commit": b.get("git_commit"), "task": task_of(b.get("config"))})
            elif e.kind == "dp":
                privacy[b.get("site", v.producer)].append({
                    "run": b.get("run"), "round": b.get("round"), "level": b.get("level"),
                    "epsilon_round": as_float(b.get("epsilon_round")),
                    "epsilon_cumulative": as_float(b.get("epsilon_cumulative")),
                    "delta": as_float(b.get("delta")), "noise_multiplier": as_float(b.get("noise_multiplier")),
                    "sample_rate": as_float(b.get("sample_rate")), "steps": b.get("steps"),
                    "max_grad_norm": as_float(b.get("max_grad_norm")), "budget": as_float(b.get("budget")),
                    "accountant": b.get("accountant"), "accountant_version": b.get("accountant_version"),
                    "state": str(b.get("state") or "spent")[:40], "ledger_seq": b.get("ledger_seq")})
            elif e.kind == "secagg":
                secagg.append({"producer": v.producer, **{k: b.get(k) for k in (
                    "run", "round", "event", "threshold", "roster", "survivors", "dropouts", "reconstructed")}})
            elif e.kind == "refusal":
                refusals.append({"producer": v.producer, "seq": e.seq, "time": e.time, **b})
                reason = str(b.get("reason", ""))
                if v.role != "coordinator" and ("budget" in reason or reason.startswith("site policy ")):
                    declines.append({"site": v.producer, "run": b.get("run"), "round": b.get("round"),
                                     "reason": b.get("detail") or b.get("reason")})
            elif e.kind == "countersign":
                c = countersigns.setdefault(v.producer, {"subject": b["subject"], "rounds": [], "last_head": None,
                                                         "sealed": False})
                if b["round"] not in c["rounds"]:
                    c["rounds"].append(b["round"])
                c["last_head"] = b["subject_head"]
                c["sealed"] = c["sealed"] or (b["subject"], b["subject_head"]["seq"]) in seals
            elif e.kind == "boundary":
                if b.get("message") == "decline" and (b.get("direction") == "send"
                                                      or b.get("sender") not in by_producer):
                    declines.append({"site": b.get("sender"), "run": b.get("run"), "round": b.get("round"),
                                     "reason": b.get("reason") or "declined the round (privacy budget)"})
                _add_crossing(b, by_producer, crossings, per_round)
    for c in crossings.values():
        c["rounds"] = sorted(r for r in c["rounds"] if r is not None)
    runs = []
    for v in logs:
        runs += [r for r in v.runs() if r not in runs and (not result.runs or r in result.runs)]
    return {
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "verification": result.to_dict(),
        "manifest": {"runs": runs, "configs": configs, "producers": [
            {"producer": v.producer, "role": v.role, "file": v.file, "entries": len(v.entries), "closed": v.closed,
             "certificates": list(v.certificates.values())} for v in logs]},
        "threat_model": [{"title": t, "text": x} for t, x in THREAT_MODEL],
        "privacy": {site: _settled(rows) for site, rows in privacy.items()},
        "declines": _unique_declines(declines),
        "boundaries": sorted(crossings.values(),
                             key=lambda c: (c["sender"] or "", c["receiver"] or "", c["message"] or "")),
        "bytes_per_round": {d: dict(sorted(rounds.items(), key=lambda kv: kv[0] or 0))
                            for d, rounds in per_round.items()},
        "site_policies": [c.to_dict() for c in check_sites(result)],
        "secagg": secagg,
        "refusals": refusals,
        "countersignatures": countersigns,
    }


def task_of(config) -> dict:
    """What the run trains, as its logged config names it: the kind, and for a federation's own
    task its entry point, pinned version and the digests of its options and frozen model."""
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(task, dict):
        return {}
    keys = ("kind", "entry", "version", "options_sha256", "model_sha256", "labels_sha256")
    return {k: str(task[k])[:200] for k in keys if task.get(k)}


def _add_crossing(b: dict, by_producer: dict, crossings: dict, per_round: dict) -> None:
    # a crossing is counted once: from its sender's log, or its receiver's when the sender's log
    # was not given
    if b.get("direction") != "send" and b.get("sender") in by_producer:
        return
    key = (b.get("sender"), b.get("receiver"), b.get("message"))
    c = crossings.setdefault(key, {"sender": key[0], "receiver": key[1], "message": key[2],
                                   "count": 0, "bytes": 0, "tensors": {}, "rounds": set()})
    c["count"] += 1
    c["bytes"] += _int(b.get("bytes"))
    c["rounds"].add(b.get("round"))
    for t in b.get("tensors") or []:
        if isinstance(t, dict):
            c["tensors"][str(t.get("name"))] = {"shape": t.get("shape"), "dtype": t.get("dtype")}
    direction = "to coordinator" if by_producer.get(b.get("receiver")) and \
        by_producer[b["receiver"]].role == "coordinator" else "from coordinator"
    per_round[direction][b.get("round")] += _int(b.get("bytes"))


def _unique_declines(rows: list[dict]) -> list[dict]:
    """One row per (site, run, round): a site's refusal and its decline message tell of the same."""
    out: dict[tuple, dict] = {}
    for r in rows:
        out.setdefault((str(r["site"]), str(r["run"]), r["round"] if isinstance(r["round"], int) else -1), r)
    return [out[k] for k in sorted(out)]


def tensor_groups(tensors: dict) -> list[dict]:
    """Tensor names grouped by their pattern with layer numbers as `*` ("layers.*.w_a"), so a
    model's 130 names read as a dozen groups; each group keeps its names for the details."""
    groups: dict[str, dict] = {}
    for name, t in sorted(tensors.items()):
        g = groups.setdefault(re.sub(r"\d+", "*", name), {"names": [], "kinds": set()})
        g["names"].append(name)
        g["kinds"].add(f'{t.get("dtype")} {t.get("shape")}')
    return [{"pattern": k, "names": g["names"], "kinds": sorted(g["kinds"])} for k, g in groups.items()]


def _int(value) -> int:
    """A byte count from a signed entry; a producer's malformed value counts as 0 rather than
    stopping the report (verification has its own say)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# ---------------------------------------------------------------- plots

def _plot_epsilon(privacy: dict, path: Path) -> Path | None:
    if not privacy:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for site, rows in sorted(privacy.items()):
        ax.plot([r["round"] for r in rows], [r["epsilon_cumulative"] for r in rows], marker="o", label=site)
    budgets = {r["budget"] for rows in privacy.values() for r in rows if r["budget"]}
    for b in sorted(budgets):
        ax.axhline(b, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative epsilon")
    ax.set_title("Privacy spent per site (dashed: budget)")
    ax.legend(fontsize=8)
    return _save(fig, path, plt)


def _plot_bytes(per_round: dict, path: Path) -> Path | None:
    if not per_round:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for direction, rounds in sorted(per_round.items()):
        xs = [r for r in rounds if r is not None]
        ax.plot(xs, [rounds[r] / 1e3 for r in xs], marker="o", label=direction)
    ax.set_xlabel("round")
    ax.set_ylabel("kB (all sites)")
    ax.set_title("Bytes that crossed the site boundaries")
    ax.legend(fontsize=8)
    return _save(fig, path, plt)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, plt) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # rounds are whole numbers
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- HTML

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1d2330; line-height: 1.45; padding: 0 1em; background: #fff; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #dfe3ea; padding-bottom: 0.2em; margin-top: 1.8em; }
.banner { padding: 0.9em 1.2em; border-radius: 6px; font-size: 1.15em; font-weight: 600; }
.ok { background: #e3f5e8; color: #125c2b; border: 1px solid #9fd8b0; }
.bad { background: #fde7e7; color: #8a1414; border: 1px solid #efaaaa; }
table { border-collapse: collapse; width: 100%; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #dfe3ea; padding: 0.3em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f5f9; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: 'SFMono-Regular', Consolas, monospace; font-size: 0.85em; word-break: break-all; }
.muted { color: #5d6778; } img { max-width: 100%; border: 1px solid #dfe3ea; }
dt { font-weight: 600; margin-top: 0.6em; } dd { margin-left: 1.2em; }
ul.groups { margin: 0.2em 0; padding-left: 1.1em; } summary { cursor: pointer; }
.held { color: #125c2b; } .violated { color: #8a1414; }
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset(),
           empty: str = "(none recorded)") -> str:
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: Path | None, alt: str) -> str:
    if path is None or not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else (f"{x:.{digits}g}" if isinstance(x, float) else str(x))


def render_html(data: dict, images: dict[str, Path | None], leakage: dict | None = None) -> str:
    v = data["verification"]
    if v["ok"]:
        banner = (f'<div class="banner ok">VERIFIED: {len(v["logs"])} log(s), every chain, signature and '
                  'cross-check passed.</div>')
    else:
        first = v["first"]
        where = f'{first["file"]}' + (f' seq {first["seq"]}' if first["seq"] is not None else "")
        banner = (f'<div class="banner bad">VERIFICATION FAILED: {len(v["errors"])} problem(s). First bad entry: '
                  f'<span class="mono">{_e(where)}</span>: {_e(first["message"])}</div>')
    m = data["manifest"]
    parts = [f"<h1>Privacy audit report</h1><p class=\"muted\">Generated {_e(data['generated'])} by "
             f"<code>ktfed audit report</code> from {len(v['logs'])} audit log(s). Run(s): "
             f"{_e(', '.join(m['runs']) or 'none recorded')}.</p>", banner]
    if data["site_policies"]:   # the verdict of section 5 at a glance
        parts.append("<p>Site policies: " + "; ".join(_e(s["line"]) for s in data["site_policies"]) + ".</p>")
    parts.append("<h2>1. Threat model, in plain words</h2><dl>" + "".join(
        f"<dt>{_e(t['title'])}</dt><dd>{_e(t['text'])}</dd>" for t in data["threat_model"]) + "</dl>")
    parts.append("<h2>2. Run manifest</h2><h3>Who kept a log, and with which certificate</h3>" + _table(
        ["producer", "role", "entries", "ends with close", "certificate SHA-256", "serial", "valid until"],
        [[_e(p["producer"]), _e(p["role"]), _e(p["entries"]), "yes" if p["closed"] else "<b>no</b>",
          "<br>".join(f'<span class="mono">{_e(c["fingerprint"])}</span>' for c in p["certificates"]),
          "<br>".join(_e(c["serial"]) for c in p["certificates"]),
          "<br>".join(_e(c["not_after"][:10]) for c in p["certificates"])] for p in m["producers"]]))
    parts.append("<h3>Configuration and code</h3>" + _table(
        ["producer", "run", "task", "config SHA-256", "git commit", "package versions"],
        [[_e(c["producer"]), _e(c["run"]), _e(", ".join(f"{k} {x}" for k, x in c.get("task", {}).items())),
          f'<span class="mono">{_e(c["config_sha256"])}</span>',
          f'<span class="mono">{_e(c["git_commit"] or "unknown")}</span>',
          _e(", ".join(f"{k} {x}" for k, x in sorted(c["versions"].items())))] for c in m["configs"]]))
    parts.append("<h2>3. Privacy spent (differential privacy)</h2><p>Each site's own accounting, as it logged "
                 "it: epsilon of the round alone and cumulative over every round so far (composed, not summed), "
                 "at the stated delta.</p>" + _img(images.get("epsilon"), "cumulative epsilon per site"))
    rows = []
    for site, entries in sorted(data["privacy"].items()):
        for r in entries:
            rows.append([_e(site), _e(r["run"]), _e(r["round"]), _e(r.get("state", "spent")), _e(_fmt(r["epsilon_round"])),
                         _e(_fmt(r["epsilon_cumulative"])), _e(_fmt(r["budget"])), _e(_fmt(r["delta"], 3)),
                         _e(_fmt(r["noise_multiplier"])), _e(_fmt(r["sample_rate"])), _e(r["steps"]),
                         _e(_fmt(r["max_grad_norm"])), _e(f'{r["accountant"]} ({r["accountant_version"]})')])
    parts.append(_table(["site", "run", "round", "ledger state", "epsilon (round)", "epsilon (cumulative)", "budget",
                         "delta", "noise multiplier", "sample rate", "steps", "clip", "accountant"], rows,
                        numeric={2, 4, 5, 6, 7, 8, 9, 10, 11}))
    parts.append("<h3>Rounds a site declined (its privacy budget, or its site policy)</h3>" + _table(
        ["site", "run", "round", "why"],
        [[_e(d["site"]), _e(d["run"]), _e(d["round"]), _e(d["reason"])] for d in data["declines"]],
        numeric={2}, empty="No site declined a round."))
    parts.append("<h2>4. What crossed each boundary</h2><p>Every message between a site and the coordinator, "
                 "counted once, with the tensors it carried (names, shapes) and its size. Both ends logged its "
                 "SHA-256; section 8 says whether they agree.</p>" + _img(images.get("bytes"), "bytes per round"))
    parts.append(_table(["from", "to", "message", "count", "total bytes", "rounds", "tensors (shape, dtype)"],
                        [[_e(c["sender"]), _e(c["receiver"]), _e(c["message"]), _e(c["count"]), _e(c["bytes"]),
                          _e(_ranges(c["rounds"])),
                          _tensors_html(c["tensors"])]
                         for c in data["boundaries"]], numeric={3, 4}))
    parts.append(_policies_html(data["site_policies"]))
    parts.append(_secagg_html(data["secagg"]))
    parts.append("<h2>7. Refusals and countersignatures</h2><h3>Refused messages</h3>" + _table(
        ["by", "run", "round", "peer", "message", "reason", "detail"],
        [[_e(r["producer"]), _e(r.get("run")), _e(r.get("round")), _e(r.get("peer")), _e(r.get("message")),
          _e(r.get("reason")), _e(r.get("detail"))] for r in data["refusals"]]))
    parts.append("<h3>Countersignatures of the coordinator's chain</h3>" + _table(
        ["site", "of", "rounds countersigned", "last head countersigned", "countersigned the seal"],
        [[_e(site), _e(c["subject"]), _e(_ranges(c["rounds"])),
          f'seq {_e(c["last_head"]["seq"])} <span class="mono">{_e(c["last_head"]["hash"][:16])}...</span>',
          "yes" if c["sealed"] else "<b>no</b>"]
         for site, c in sorted(data["countersignatures"].items())]))
    parts.append("<h2>8. Verification</h2>" + banner + _table(
        ["severity", "file", "seq", "what is wrong"],
        [[_e(p["severity"]), f'<span class="mono">{_e(p["file"])}</span>', _e(p["seq"]), _e(p["message"])]
         for p in v["errors"] + v["warnings"]], empty="No errors and no warnings."))
    if leakage:
        parts.append(_leakage_html(leakage, images.get("reconstructions")))
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ktfed privacy audit report"
            f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def _secagg_html(events: list[dict]) -> str:
    return ("<h2>6. Secure aggregation</h2><p>Per round: who took part, who dropped out (and at which step), "
            "and which secrets the coordinator rebuilt from shares. A self-mask is rebuilt for a site that "
            "finished; a key for one that dropped; never both for the same site.</p>" + _table(
                ["run", "round", "event", "threshold t", "roster", "survivors", "dropouts", "secrets rebuilt"],
                [[_e(s["run"]), _e(s["round"]), _e(s["event"]), _e(s["threshold"]),
                  _e(", ".join(s["roster"] or [])), _e(", ".join(s["survivors"] or [])),
                  _e(", ".join(f"{k} ({x})" for k, x in (s["dropouts"] or {}).items()) or "none"),
                  _e("; ".join(f'{r.get("secret")} of {r.get("of")}' for r in (s["reconstructed"] or []))
                     or "none")]
                 for s in events], numeric={1, 3}))


def _policies_html(sites: list[dict]) -> str:
    """Each site's policy (digest, its rules in short) beside the verdict on what it sent, then
    what the sites refused by their policies (ktfed/audit_policy.py says what is judged)."""
    rows, shown = [], {}   # a policy's rules are listed once; the next site with it refers back
    for s in sites:
        policy = "<br>".join(f'<span class="mono">{_e(p["digest"][:16])}...</span> {_e(p["source"])}<br>'
                             f'<span class="muted">run(s) {_e(", ".join(p["runs"]))}</span>' for p in s["policies"])
        rules = "<br>".join(f'<span class="muted">the same rules as {_e(shown[p["digest"]])}</span>'
                            if p["digest"] in shown else "<br>".join(f"<code>{_e(r)}</code>" for r in p["rules"])
                            for p in s["policies"])
        shown.update({p["digest"]: s["site"] for p in s["policies"] if p["digest"] not in shown})
        rows.append([_e(s["site"]), policy or '<span class="muted">no site policy recorded</span>', rules or "-",
                     _policy_verdict(s)])
    refused = [[_e(s["site"]), _e(r["run"]), _e(r["round"]), _e(r["message"]), f'<code>{_e(r["rule"])}</code>',
                _e(r["detail"])] for s in sites for r in s["refusals"]]
    return ("<h2>5. Each site's policy beside what crossed</h2><p>The policy each site recorded at every join "
            "(rebuilt from its log, checked against its digest), and every message the site sent in that run "
            "judged against it: the run's settings, each update's tensor names and size, SecAgg and DP as the "
            "policy requires, the epsilon its ledger spent. A crossing the policy did not allow is flagged with "
            "the rule, the run, its rounds and the first message.</p>"
            + _table(["site", "policy (SHA-256, file, runs)", "rules (the main ones and any not at the default)",
                      "what crossed"], rows, empty="No site log was given.")
            + "<h3>What the sites refused by their policies</h3>"
            + _table(["site", "run", "round", "message", "rule", "detail"], refused, numeric={2},
                     empty="No site refused anything by its policy."))


def _policy_verdict(s: dict) -> str:
    if s["status"] == "none":
        return f'<span class="muted">not judged: no site policy recorded ({_e(s["unchecked"])} messages sent)</span>'
    found = "".join(f'<li><b><code>{_e(v["rule"])}</code></b> run {_e(v["run"])}, round(s) {_e(_ranges(v["rounds"]))}'
                    f' ({_e(v["crossings"])} crossing(s), first: {_e(v["first"])}): {_e(v["detail"])}</li>'
                    for v in s["violations"])
    problems = "".join(f"<li>{_e(p)}</li>" for p in s["problems"])
    more = f'<li class="muted">{_e(s["left_out"])} more not listed</li>' if s["left_out"] else ""
    if s["status"] == "held":
        head = f'<b class="held">held</b>: {_e(s["crossings"])} messages sent, each judged against it'
    else:
        head = f'<b class="violated">{len(s["violations"])} violation(s)</b> in {_e(s["crossings"])} messages sent' \
            if s["violations"] else "<b>not fully judged</b>"
    return head + (f'<ul class="groups">{found}{problems}{more}</ul>' if found or problems or more else "")


def _tensors_html(tensors: dict) -> str:
    """A count and the groups at a glance; every name on demand (<details>, no script)."""
    if not tensors:
        return "-"
    groups = tensor_groups(tensors)
    items = "".join(
        f'<li><details><summary><span class="mono">{_e(g["pattern"])}</span> &times;{len(g["names"])} '
        f'({_e("; ".join(g["kinds"][:3]))}{"; ..." if len(g["kinds"]) > 3 else ""})</summary>'
        + "<br>".join(f'<span class="mono">{_e(n)}</span>' for n in g["names"]) + "</details></li>"
        for g in groups)
    return (f"<details><summary>{len(tensors)} tensor(s) in {len(groups)} group(s)</summary>"
            f'<ul class="groups">{items}</ul></details>')


def _leakage_html(leakage: dict, picture: Path | None) -> str:
    rows = [[_e(r["condition"]), _e(r["description"]), _e(f'{r["analytic_psnr"]:.1f}'), _e(f'{r["dlg_psnr"]:.1f}'),
             _e(f'{r["dlg_ssim"]:.3f}'), _e(f'{r["recovered"]:.2f}'), _e(f'{r["mia_auc"]:.3f}'),
             _e(f'{r["mia_tpr_at_1pct_fpr"]:.3f}'), _e(f'{r["epsilon_lower_bound"]:.3f}'),
             _e(r["epsilon_accountant"] if isinstance(r["epsilon_accountant"], str)
                else _fmt(r["epsilon_accountant"]))] for r in leakage["rows"]]
    return ("<h2>9. Empirical leakage tests</h2><p>From <code>ktfed audit attack</code>: what an attacker who sees "
            "a site's update recovers (image reconstruction PSNR / SSIM, share of images recovered), how well it "
            "tells members from non-members (AUC; 0.5 = chance), and the epsilon that one run with canaries "
            "proves at 95% confidence (a lower bound: it must never exceed the accountant's epsilon).</p>"
            + _table(["condition", "what the attacker sees", "analytic PSNR dB", "inversion PSNR dB", "inversion SSIM",
                      "recovered", "MIA AUC", "TPR at 1% FPR", "epsilon lower bound", "accountant epsilon"], rows,
                     numeric={2, 3, 4, 5, 6, 7, 8, 9}) + _img(picture, "reconstructions"))


def _ranges(values) -> str:
    values = sorted({v for v in values if isinstance(v, int)})
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(out)


def write_report(result: VerifyResult, out: Path, leakage_dir: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = collect(result)
    images = {"epsilon": _plot_epsilon(data["privacy"], out / "epsilon.png"),
              "bytes": _plot_bytes(data["bytes_per_round"], out / "bytes.png")}
    leakage = None
    if leakage_dir is not None:
        leakage = json.loads((leakage_dir / "leakage.json").read_text())
        data["leakage"] = leakage
        picture = out / "reconstructions.png"
        if (leakage_dir / "reconstructions.png").exists():
            picture.write_bytes((leakage_dir / "reconstructions.png").read_bytes())
            images["reconstructions"] = picture
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str))
    html_path = out / "index.html"
    html_path.write_text(render_html(data, images, leakage), encoding="utf-8")
    files = [out / "report.json"] + [p for p in images.values() if p is not None]
    return {"html": html_path, "files": files, "site_policies": data["site_policies"]}
