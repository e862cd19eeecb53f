"""Each site's policy beside what crossed its boundary: the auditor's check, offline.

At every join a site records, in its `config` audit entry, the run config the coordinator sent
and the site policy it judged that run by (`policy_sha256`, `policy_source`, `policy`: the rules).
`check_sites(result)` rebuilds that policy from the verified log (participant.policy.from_table,
the same parser the site used) and judges every message the site sent afterwards in that run:

  every message but a decline   the run's recorded config against the policy (participant.policy.
                                check_join: task, adapter and targets, backbone, SecAgg
                                required / threshold / roster, DP required / level / delta /
                                noise / clip / epsilon budget, rounds), once per run and policy
  update (a plain upload)       each tensor name against egress.tensor_patterns, its bytes against
                                egress.max_upload_bytes, and secagg.required (a plain upload is
                                not secure aggregation), the round against limits.max_rounds_per_run
  secagg/masked_input           its bytes against egress.max_upload_bytes (see MASKED_FRAMING)
  the site's DP ledger          the level, epsilon spent so far, delta, noise and clip of each round

A finding is a `violation` naming the rule, the run, the rounds and the first crossing; findings
of one rule in one run are one row, so a long run stays one line. The site's own refusals by its
policy (`refusal` entries whose reason starts "site policy") are listed beside: they are the
policy holding, not breaking. Everything read from a log is bounded (MAX_ROWS, MAX_TEXT) and
checked by the policy's and the run config's own parsers; what does not parse is a `problem`.

Not judged offline: limits.max_runs_per_day, and privacy.max_epsilon_lifetime beyond one run's own
budget (the site's run history, STATE/policy-runs.json, is not in its log); coordinator.* (the
site checks it in a TLS handshake of its own before joining, which no log entry records);
limits.max_global_step only in its part that does not grow with the model's size (the log holds no
tensor count, so SecAgg's rounding and central DP's noise are left out: a lower bound, which can
miss a run the site refused but never flags one it rightly took).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections import defaultdict
from dataclasses import dataclass, field

from kt_core.config import ConfigError, RunConfig
from kt_core.config import from_table as config_from_table
from participant import policy as site_policy
from participant.policy import SitePolicy, Violation
from security.audit import AuditError, VerifyResult, as_float
from security.audit.crosscheck import entry_run

MAX_ROWS = 50       # violations, refusals and problems listed per site; the rest are counted
MAX_TEXT = 300      # characters of a name, reason or detail taken from a log
# A masked input holds one 32-bit entry per shared float32 value, the hidden sample count and a
# short header (85 bytes more than the update in the demo): an update the limit allowed never
# makes a masked input larger than the limit plus this.
MASKED_FRAMING = 4096


def _text(value, limit: int = MAX_TEXT) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- reading back what the log recorded -------------------------------------------------------------

def restored(cls, table):
    """`table` as `cls`'s parser expects it: the audit log stores every float as its repr string
    (security.audit.canonical), so floats are read back where `cls` declares one; anything else
    is left for the parser to accept or name."""
    if not isinstance(table, dict) or not dataclasses.is_dataclass(cls):
        return table
    hints = typing.get_type_hints(cls)
    return {key: _restored_value(hints.get(key), value) for key, value in table.items()}


def _restored_value(hint, value):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return restored(hint, value)
    if origin in (typing.Union, types.UnionType) and value is not None:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _restored_value(options[0], value) if options else value
    if origin is dict and isinstance(value, dict):
        item = typing.get_args(hint)[1]
        return {k: _restored_value(item, v) for k, v in value.items()}
    if hint is float and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def recorded_policy(body: dict) -> SitePolicy:
    """The policy a `config` entry recorded; ConfigError when it does not parse or does not hash
    to the digest recorded beside it."""
    source = _text(body.get("policy_source") or "the audit log", 200)
    policy = site_policy.from_table(restored(SitePolicy, body.get("policy")), source)
    if policy.digest() != body.get("policy_sha256"):
        raise ConfigError(f"{source}: the recorded rules hash to {policy.digest()[:16]}..., not to the recorded "
                          f"policy_sha256 {_text(body.get('policy_sha256'), 64)}")
    return policy


def recorded_config(body: dict) -> RunConfig:
    """The run config a `config` entry recorded (ConfigError when it does not parse)."""
    table = body.get("config")
    if not isinstance(table, dict):
        raise ConfigError("the entry holds no run config")
    try:
        return config_from_table(restored(RunConfig, table))
    except (TypeError, ValueError) as err:   # ConfigError is a ValueError
        raise ConfigError(str(err)) from None


def rules_in_short(policy: SitePolicy) -> list[str]:
    """The rules an auditor looks at first, and every rule the site set away from the default."""
    default, mine = SitePolicy(), policy
    always = {"model.adapters", "egress.tensor_patterns", "egress.max_upload_bytes", "secagg.required",
              "privacy.required"}
    out = []
    for section in site_policy.SECTIONS:
        for f in dataclasses.fields(getattr(mine, section)):
            value, base = getattr(getattr(mine, section), f.name), getattr(getattr(default, section), f.name)
            name = f"{section}.{f.name}"
            if name in always or value != base:
                out.append(f"{name} = {_shown(value)}")
    return out


def _shown(value) -> str:
    """A rule's value as the policy file would say it, without quotes: `true`, `10`, `a, b`."""
    if isinstance(value, tuple):
        return ", ".join(value) or "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


# -- judging one site's log -------------------------------------------------------------------------

@dataclass
class _RunAtSite:
    """What the site's log says of one run so far: the policy and config of its last join."""
    policy: SitePolicy | None
    config: RunConfig | None
    backbone: str = ""              # the backbone it received (sha256), for model.backbone_sha256
    budget: float | None = None     # the epsilon budget its ledger enforced (its own may be stricter)
    run_violations: list[Violation] | None = None   # check_join's verdict, once per join


@dataclass
class SiteCheck:
    """One site's policies, the messages it sent judged against them, and its policy refusals."""
    site: str
    policies: dict[str, dict] = field(default_factory=dict)     # digest -> digest, source, runs, rules
    findings: dict[tuple, dict] = field(default_factory=dict)   # (rule, run) -> one violation row
    refusals: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    crossings: int = 0     # messages sent under a recorded policy, each judged
    unchecked: int = 0     # messages sent in a run whose policy is not known
    left_out: int = 0      # rows past MAX_ROWS, counted only

    @property
    def status(self) -> str:
        if not self.policies:
            return "none"
        if self.findings:
            return "violated"
        return "incomplete" if self.problems else "held"

    def line(self) -> str:
        """The one line the CLI prints for this site."""
        digests = ", ".join(d[:12] for d in self.policies)
        refused = sorted({r["rule"] for r in self.refusals})
        also = f"; it refused {len(self.refusals)} time(s) by its policy ({', '.join(refused)})" if refused else ""
        if self.status == "none":
            return f"{self.site}: no site policy recorded" + (f" ({self.unchecked} messages sent unjudged)"
                                                              if self.unchecked else "")
        if self.status == "violated":
            rules = sorted({f["rule"] for f in self.findings.values()})
            return (f"{self.site}: policy {digests}: {len(self.findings)} violation(s) ({', '.join(rules)}) "
                    f"in {self.crossings} messages sent{also}")
        if self.status == "incomplete":
            return f"{self.site}: policy {digests}: not fully judged: {self.problems[0]}"
        return f"{self.site}: policy {digests} held ({self.crossings} messages sent, each judged against it){also}"

    def to_dict(self) -> dict:
        findings = [{**f, "rounds": sorted(f["rounds"])} for f in self.findings.values()]
        return {"site": self.site, "status": self.status, "line": self.line(), "policies": list(self.policies.values()),
                "violations": findings, "refusals": self.refusals, "problems": self.problems,
                "crossings": self.crossings, "unchecked": self.unchecked, "left_out": self.left_out}

    # -- what each kind of entry adds --------------------------------------------------------------
    def joined(self, run: str, body: dict, runs: dict[str, _RunAtSite]) -> None:
        before = runs.get(run)
        runs[run] = at = _RunAtSite(None, None, before.backbone if before else "", before.budget if before else None)
        if "policy" not in body and "policy_sha256" not in body:
            return   # a site that recorded no policy (an older agent): its messages stay unjudged
        try:
            at.policy = recorded_policy(body)
        except ConfigError as err:
            self._problem(f"run {_text(run, 80)}: the recorded site policy cannot be rebuilt: {err}")
            return
        try:
            at.config = recorded_config(body)
        except ConfigError as err:
            self._problem(f"run {_text(run, 80)}: the recorded run config does not parse: {_text(err)}")
        row = self.policies.get(at.policy.digest())
        if row is None and len(self.policies) < MAX_ROWS:
            row = self.policies[at.policy.digest()] = {"digest": at.policy.digest(), "source": at.policy.source,
                                                       "runs": [], "rules": rules_in_short(at.policy)}
        if row is not None and run not in row["runs"] and len(row["runs"]) < MAX_ROWS:
            row["runs"].append(run)

    def refused(self, run: str, body: dict, seq: int) -> None:
        reason = str(body.get("reason", ""))
        if not reason.startswith("site policy "):
            return
        if len(self.refusals) >= MAX_ROWS:
            self.left_out += 1
            return
        self.refusals.append({"run": _text(run, 80), "round": _int(body.get("round")), "seq": seq,
                              "message": _text(body.get("message"), 64),
                              "rule": _text(reason.removeprefix("site policy "), 80),
                              "detail": _text(body.get("detail") or "")})

    def spent(self, at: _RunAtSite | None, run: str, body: dict, seq: int) -> None:
        """One round of the site's DP ledger: what its updates cost, against the privacy rules."""
        if at is None or at.policy is None:
            return
        try:
            eps, delta, noise, clip, budget = (as_float(body.get(k)) for k in (
                "epsilon_cumulative", "delta", "noise_multiplier", "max_grad_norm", "budget"))
        except AuditError as err:
            self._problem(f"run {_text(run, 80)}: DP ledger entry seq {seq} unreadable: {err}")
            return
        at.budget = budget if budget is not None else at.budget
        p, round_no = at.policy.privacy, _int(body.get("round"))
        found = []
        if p.levels and body.get("level") not in p.levels:
            found.append(Violation("privacy.levels", f"DP at level {_text(body.get('level'), 20)!r}"))
        if p.max_epsilon_per_run and eps is not None and eps > p.max_epsilon_per_run:
            found.append(Violation("privacy.max_epsilon_per_run", f"epsilon {eps:.4g} spent, above "
                                                                  f"{p.max_epsilon_per_run:g}"))
        if p.max_delta and delta is not None and delta > p.max_delta:
            found.append(Violation("privacy.max_delta", f"delta {delta:g} above {p.max_delta:g}"))
        if p.min_noise_multiplier and noise is not None and noise < p.min_noise_multiplier:
            found.append(Violation("privacy.min_noise_multiplier", f"noise multiplier {noise:.4g} below "
                                                                   f"{p.min_noise_multiplier:g}"))
        if p.max_clip_norm and clip is not None and clip > p.max_clip_norm:
            found.append(Violation("privacy.max_clip_norm", f"clip norm {clip:g} above {p.max_clip_norm:g}"))
        for v in found:
            self._flag(v, run, round_no, f"DP ledger (seq {seq})")

    def crossed(self, at: _RunAtSite | None, run: str, body: dict, seq: int) -> None:
        """A message this site sent: judged against the policy of the run's last join."""
        message = _text(body.get("message"), 64)
        if message == "decline":
            return   # the site saying no: its refusal entry names the rule
        if at is None or at.policy is None:
            if not self.unchecked:
                self._problem(f"run {_text(run, 80)}: {message} sent (seq {seq}) with no site policy recorded")
            self.unchecked += 1
            return
        self.crossings += 1
        round_no = _int(body.get("round"))
        if at.config is not None and at.run_violations is None:
            at.run_violations = site_policy.check_join(at.policy, at.config, site=self.site, shared={},
                                                       backbone_sha256=at.backbone, run_id=run,
                                                       epsilon_budget=at.budget)
        found = list(at.run_violations or [])
        limit = at.policy.limits.max_rounds_per_run
        if limit and round_no is not None and round_no > limit:
            found.append(Violation("limits.max_rounds_per_run", f"round {round_no} is past {limit} rounds"))
        if message == "update":
            found += _plain_update(at.policy, body)
        elif message == "secagg/masked_input":
            nbytes, limit = _int(body.get("bytes")) or 0, at.policy.egress.max_upload_bytes
            if limit and nbytes > limit + MASKED_FRAMING:
                found.append(Violation("egress.max_upload_bytes", f"a masked input of {nbytes} bytes: its update "
                                                                  f"was larger than {limit}"))
        for v in found:
            self._flag(v, run, round_no, f"{message} (seq {seq})")

    def _flag(self, v: Violation, run: str, round_no: int | None, crossing: str) -> None:
        key = (v.rule, run)
        row = self.findings.get(key)
        if row is None:
            if len(self.findings) >= MAX_ROWS:
                self.left_out += 1
                return
            row = self.findings[key] = {"rule": v.rule, "run": _text(run, 80), "rounds": set(), "crossings": 0,
                                        "first": crossing, "detail": _text(v.detail)}
        row["crossings"] += 1
        if round_no is not None and len(row["rounds"]) < 1000:
            row["rounds"].add(round_no)

    def _problem(self, text: str) -> None:
        if len(self.problems) < MAX_ROWS:
            self.problems.append(text)
        else:
            self.left_out += 1


def _plain_update(policy: SitePolicy, body: dict) -> list[Violation]:
    """A plain upload: its tensors by name, its size, and whether it should have been masked."""
    out = []
    if policy.secagg.required:
        out.append(Violation("secagg.required", "a plain upload, not secure aggregation"))
    tensors = body.get("tensors") if isinstance(body.get("tensors"), list) else []
    names = [str(t.get("name")) for t in tensors if isinstance(t, dict)]
    outside = [n for n in names if not site_policy.tensor_allowed(policy, n)]
    if outside:
        out.append(Violation("egress.tensor_patterns", f"{len(outside)} of {len(names)} tensors allowed by no pattern, "
                                                       f"e.g. {_text(outside[0], 120)!r}"))
    nbytes, limit = _int(body.get("bytes")) or 0, policy.egress.max_upload_bytes
    if limit and nbytes > limit:
        out.append(Violation("egress.max_upload_bytes", f"an update of {nbytes} bytes, more than {limit}"))
    return out


def check_site(site: str, views, runs: list[str] | None = None) -> SiteCheck:
    """Walk a site's verified logs in order; each entry is judged by the policy of its run's last join."""
    check, state = SiteCheck(site), {}
    for view in views:
        for e in view.entries:
            run = entry_run(e)
            if run is None or (runs and run not in runs):
                continue
            if e.kind == "config":
                check.joined(run, e.body, state)
            elif e.kind == "refusal":
                check.refused(run, e.body, e.seq)
            elif e.kind == "dp":
                check.spent(state.get(run), run, e.body, e.seq)
            elif e.kind == "boundary" and e.body.get("direction") == "receive" \
                    and e.body.get("message") == "backbone" and run in state:
                state[run].backbone = _text(e.body.get("sha256"), 64)
            elif e.kind == "boundary" and e.body.get("direction") == "send" and e.body.get("sender") == site:
                check.crossed(state.get(run), run, e.body, e.seq)
    return check


def check_sites(result: VerifyResult) -> list[SiteCheck]:
    """Every site's check, from the entries that verified (a site may have several logs)."""
    views = defaultdict(list)
    for v in result.logs:
        if v.producer and v.role != "coordinator":
            views[v.producer].append(v)
    return [check_site(site, views[site], result.runs) for site in sorted(views)]
