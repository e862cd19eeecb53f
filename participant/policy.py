"""The site policy: what this site agrees to, whatever the coordinator's run config says.

The coordinator chooses a run's settings; the site's operator chooses, in one TOML file
(`ktfed participant run --policy FILE`), which of those choices the site accepts. Every check
here is made at the site before anything is trained or sent: at join (`check_join`, the whole
run config and factor manifest), at every round assignment (`check_assignment`), at every SecAgg step
(`check_step`) and in the egress guard (`patterns`, `max_upload_bytes`). A violation is a
`Violation` naming the rule by its dotted field, e.g. `model.adapters`; the caller declines.

Without a file the site runs under `SitePolicy()`, the documented default (README "Site policy").
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from kt_core.config_file import ConfigError, build, check_known, parse_toml, read_text
from kt_core.config import RunConfig
from participant.state_check import max_global_step

RECORD, USER = "record", "user"
ADAPTER_KINDS = ("waffle", "lora", "ffa_lora", "dense")
MAX_POLICY_BYTES = 1 << 20


@dataclass(frozen=True)
class Violation:
    rule: str      # the policy field, dotted: "secagg.required"
    detail: str
    # "site policy": a rule of the policy file; "run": the run's own settings cannot work at this
    # site (rule "unworkable", participant.site_run: kt_core.config_file.RunUnworkable)
    source: str = "site policy"

    @property
    def reason(self) -> str:
        return f"{self.source} {self.rule}"

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class CoordinatorRules:
    name: str = ""        # the coordinator certificate's name (CN); "" = any the CA signed
    ca_sha256: str = ""   # SHA-256 of the federation CA certificate (DER); "" = not pinned


@dataclass(frozen=True)
class ModelRules:
    # task kinds; a federation's own task ("python") only when listed: as "python" (any task this
    # site's operator installed, at the version the run names) or by its entry ("pkg.module:Class")
    tasks: tuple[str, ...] = ("image", "vln")
    # dense shares every weight of the model's update: refused unless the operator lists it
    adapters: tuple[str, ...] = ("waffle", "lora", "ffa_lora")
    backbone_sha256: tuple[str, ...] = ()   # () = any backbone the run names
    adapter_targets: tuple[str, ...] = ()   # () = any
    # an image run with WAFFLe must keep the output layer's bias at the site: it holds the site's
    # label prior, and its gradient names a batch's labels (kt_core.factorized, "Why a private
    # output bias"); false lets a run share it
    private_output_bias: bool = True


@dataclass(frozen=True)
class EgressRules:
    tensor_patterns: tuple[str, ...] = ("*",)   # fnmatch patterns of tensor names that may leave
    max_upload_bytes: int = 256 << 20           # one round's update; 0 = no limit


@dataclass(frozen=True)
class SecAggRules:
    required: bool = False
    min_threshold: int = 0        # the smallest Shamir t this site accepts
    min_sites: int = 0     # the smallest roster it accepts (under SecAgg)
    max_sites: int = 0     # 0 = no limit
    active_required: bool = False


@dataclass(frozen=True)
class PrivacyRules:
    required: bool = False
    levels: tuple[str, ...] = (RECORD, USER)
    max_epsilon_per_run: float = 0.0    # 0 = no limit
    max_epsilon_lifetime: float = 0.0   # over every run this site joined; 0 = no limit
    max_delta: float = 0.0              # 0 = no limit
    min_noise_multiplier: float = 0.0
    max_clip_norm: float = 0.0          # 0 = no limit


@dataclass(frozen=True)
class LimitRules:
    max_rounds_per_run: int = 0   # 0 = no limit
    max_runs_per_day: int = 0
    # the longest L2 step one round of the run's aggregation may move the global state
    # (participant.state_check.max_global_step: server_lr x clip_norm, plus SecAgg rounding and
    # central DP noise); the site checks every state it is sent against it. 0 = no limit
    max_global_step: float = 0.0
    # the largest backbone checkpoint this site downloads: the coordinator announces the size, and
    # the file goes to the site's disk before its digest can be checked at the end. 0 = no limit
    max_backbone_bytes: int = 8 << 30


@dataclass(frozen=True)
class MetricRules:
    report: tuple[str, ...] = ("*",)   # patterns of the round metrics this site reports


@dataclass(frozen=True)
class SitePolicy:
    coordinator: CoordinatorRules = field(default_factory=CoordinatorRules)
    model: ModelRules = field(default_factory=ModelRules)
    egress: EgressRules = field(default_factory=EgressRules)
    secagg: SecAggRules = field(default_factory=SecAggRules)
    privacy: PrivacyRules = field(default_factory=PrivacyRules)
    limits: LimitRules = field(default_factory=LimitRules)
    metrics: MetricRules = field(default_factory=MetricRules)
    source: str = "<default>"

    def digest(self) -> str:
        """SHA-256 of the policy's canonical JSON: what the site's audit log records at every run."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        table = dataclasses.asdict(self)
        table.pop("source")
        return json.dumps(table, sort_keys=True)

    def reported_metrics(self, metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if any(fnmatch.fnmatchcase(k, p) for p in self.metrics.report)}


SECTIONS = {name: cls for name, cls in typing.get_type_hints(SitePolicy).items() if name != "source"}


def load(path: Path | str) -> SitePolicy:
    return loads(read_text(path, "site policy", MAX_POLICY_BYTES), str(path))


def loads(text: str, source: str = "<policy>") -> SitePolicy:
    return from_table(parse_toml(text, source), source)


def from_table(table: dict, source: str) -> SitePolicy:
    """A policy from its tables: a parsed file, or the `policy` a site's audit log recorded."""
    try:
        check_known(table, SECTIONS, "", kind="section")
        policy = SitePolicy(**{name: build(cls, table.get(name, {}), name) for name, cls in SECTIONS.items()},
                            source=source)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    _check_rules(policy, source)
    return policy


def _check_rules(p: SitePolicy, source: str) -> None:
    """The rules one by one, then the contradictions between them."""
    def fail(rule: str, message: str):
        raise ConfigError(f"{source}: {rule}: {message}")

    # every count, size, budget and norm a policy sets is a limit: none is negative
    for section in SECTIONS:
        for name, value in dataclasses.asdict(getattr(p, section)).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                fail(f"{section}.{name}", f"must be >= 0, got {value!r}")

    sha = p.coordinator.ca_sha256
    if sha and not _is_sha256(sha):
        fail("coordinator.ca_sha256", f"must be a SHA-256 hex digest (64 lowercase hex digits), got {sha!r}")
    for sha in p.model.backbone_sha256:
        if not _is_sha256(sha):
            fail("model.backbone_sha256", f"must be SHA-256 hex digests, got {sha!r}")
    for kind in p.model.adapters:
        if kind not in ADAPTER_KINDS:
            fail("model.adapters", f"{kind!r} is not one of {list(ADAPTER_KINDS)}")
    if not p.model.tasks:
        fail("model.tasks", "an empty list accepts no run at all")
    if not p.egress.tensor_patterns:
        fail("egress.tensor_patterns", "an empty list lets no update leave (list at least one pattern)")
    for level in p.privacy.levels:
        if level not in (RECORD, USER):
            fail("privacy.levels", f"{level!r} is not one of ['record', 'user']")
    if p.privacy.required and not p.privacy.levels:
        fail("privacy.levels", "privacy.required with no level accepts no run")
    if p.privacy.max_delta >= 1:
        fail("privacy.max_delta", f"must be below 1, got {p.privacy.max_delta}")
    s = p.secagg
    if s.max_sites and s.min_sites > s.max_sites:
        fail("secagg.min_sites", f"{s.min_sites} is larger than secagg.max_sites "
                                        f"{s.max_sites}")
    if s.max_sites and s.min_threshold > s.max_sites:
        fail("secagg.min_threshold", f"t={s.min_threshold} is larger than secagg.max_sites "
                                     f"{s.max_sites}: no round could ever be unmasked")
    if (s.min_threshold or s.active_required or s.min_sites) and not s.required:
        rule = "min_threshold" if s.min_threshold else "active_required" if s.active_required else "min_sites"
        fail(f"secagg.{rule}", "is a rule of secure aggregation: set secagg.required = true")
    lifetime, per_run = p.privacy.max_epsilon_lifetime, p.privacy.max_epsilon_per_run
    if lifetime and per_run > lifetime:
        fail("privacy.max_epsilon_per_run", f"{per_run} is larger than privacy.max_epsilon_lifetime {lifetime}")


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


# -- the checks ------------------------------------------------------------------------------------

def adapter(config: RunConfig):
    """(kind, targets) of the run's adapter: the MLP's for the image task, the backbone's for VLN."""
    if config.task.kind == "vln":
        return config.vln.adapter.adapter, tuple(config.vln.adapter.targets)
    if config.task.kind == "python":
        return config.task.adapter.adapter, _python_targets(config)
    return config.model.adapter, ()


def _python_targets(config: RunConfig) -> tuple[str, ...]:
    """The patterns a python run adapts: the run config's, or else the installed task class's own
    defaults (a run that names none must not slip past an `adapter_targets` rule)."""
    if config.task.adapter.targets:
        return tuple(config.task.adapter.targets)
    from kt_core.python_task import load_entry   # torch and the task's code: only for a python run

    try:
        return tuple(load_entry(config.task.entry).targets)
    except ConfigError:
        return ()   # the entry is not installed here: the join refuses it, naming task.entry


def task_allowed(tasks: tuple[str, ...], config: RunConfig) -> bool:
    """A python task passes when the policy lists "python" or names its entry."""
    return config.task.kind in tasks or (config.task.kind == "python" and config.task.entry in tasks)


def privacy_level(config: RunConfig) -> str | None:
    if not config.privacy.enabled:
        return None
    return RECORD if config.privacy.mechanism == "dp_sgd" else USER


def check_join(policy: SitePolicy, config: RunConfig, *, site: str, shared: dict[str, int],
               backbone_sha256: str = "", history: "RunHistory | None" = None, run_id: str = "",
               epsilon_budget: float | None = None, backbone_bytes: int = 0) -> list[Violation]:
    """Everything wrong with a run, before the site builds its model. `shared`: the manifest's
    shared tensors -> bytes (what one update holds); `epsilon_budget`: the site's own
    (--epsilon-budget), which with the run's makes the budget the site enforces; `backbone_bytes`:
    the size the coordinator announces for the run's backbone."""
    out: list[Violation] = []
    kind, targets = adapter(config)
    m = policy.model
    if not task_allowed(m.tasks, config):
        name = config.task.kind if config.task.kind != "python" else f"python ({config.task.entry})"
        out.append(Violation("model.tasks", f"the run's task {name!r} is not one of {list(m.tasks)}"))
    if kind not in m.adapters:
        out.append(Violation("model.adapters", f"the run's adapter {kind!r} is not one of "
                                                    f"{list(m.adapters)}"))
    if backbone_sha256 and m.backbone_sha256 and backbone_sha256 not in m.backbone_sha256:
        out.append(Violation("model.backbone_sha256", f"the run's backbone {backbone_sha256[:16]}... is not listed"))
    if m.adapter_targets and (extra := sorted(set(targets) - set(m.adapter_targets))):
        out.append(Violation("model.adapter_targets", f"the run adapts {extra}, not in {list(m.adapter_targets)}"))
    if m.private_output_bias and config.task.kind == "image" and kind == "waffle" \
            and not config.model.private_output_bias:
        out.append(Violation("model.private_output_bias", "the run shares the output layer's bias (this site's "
                                                          "label prior); this site keeps it private"))
    out += _egress(policy, shared)
    out += _secagg(policy, config)
    out += _privacy(policy, config, site, history, run_id, epsilon_budget)
    lim = policy.limits
    if lim.max_rounds_per_run and config.federation.rounds > lim.max_rounds_per_run:
        out.append(Violation("limits.max_rounds_per_run", f"the run asks for {config.federation.rounds} rounds, "
                                                          f"more than {lim.max_rounds_per_run}"))
    if lim.max_global_step:
        # the states are float32: 4 bytes an element
        step = max_global_step(config, sum(shared.values()) // 4)
        if step > lim.max_global_step:
            out.append(Violation("limits.max_global_step", f"the run's aggregation can move the global state by "
                                                           f"{step:.6g} a round (server_lr x clip_norm and what "
                                                           f"secure aggregation and DP add), more than "
                                                           f"{lim.max_global_step:g}"))
    if lim.max_backbone_bytes and backbone_bytes > lim.max_backbone_bytes:
        out.append(Violation("limits.max_backbone_bytes", f"the run's backbone is announced as {backbone_bytes} "
                                                          f"bytes, more than {lim.max_backbone_bytes}"))
    if lim.max_runs_per_day and history is not None:
        recent = history.runs_since(time.time() - 86400, excluding=run_id)
        if recent >= lim.max_runs_per_day:
            out.append(Violation("limits.max_runs_per_day", f"this site joined {recent} runs in the last 24 h, "
                                                            f"at most {lim.max_runs_per_day}"))
    return out


def _egress(policy: SitePolicy, shared: dict[str, int]) -> list[Violation]:
    out = []
    outside = sorted(n for n in shared if not tensor_allowed(policy, n))
    if outside:
        out.append(Violation("egress.tensor_patterns", f"the manifest shares {len(outside)} tensors no pattern "
                                                       f"allows, e.g. {outside[0]!r}"))
    total, limit = sum(shared.values()), policy.egress.max_upload_bytes
    if limit and total > limit:
        out.append(Violation("egress.max_upload_bytes", f"an update of this run is {total} bytes, more than {limit}"))
    return out


def tensor_allowed(policy: SitePolicy, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in policy.egress.tensor_patterns)


def _secagg(policy: SitePolicy, config: RunConfig) -> list[Violation]:
    s, run = policy.secagg, config.secagg
    if not s.required:
        return []
    if not run.enabled:
        return [Violation("secagg.required", "the run does not use secure aggregation")]
    out = []
    if s.active_required and not run.active:
        out.append(Violation("secagg.active_required", "the run's secure aggregation is not the active option"))
    if run.threshold and run.threshold < s.min_threshold:
        out.append(Violation("secagg.min_threshold", f"the run's threshold t={run.threshold} is below "
                                                     f"{s.min_threshold}"))
    if s.min_sites and config.federation.min_sites < s.min_sites:
        out.append(Violation("secagg.min_sites", f"the run would aggregate as few as "
                                                        f"{config.federation.min_sites} sites, fewer than "
                                                        f"{s.min_sites}"))
    return out


def _privacy(policy: SitePolicy, config: RunConfig, site: str, history: "RunHistory | None",
             run_id: str, local_budget: float | None) -> list[Violation]:
    p, run = policy.privacy, config.privacy
    level = privacy_level(config)
    if level is None:
        return [Violation("privacy.required", "the run does not use differential privacy")] if p.required else []
    out = []
    if level not in p.levels:
        out.append(Violation("privacy.levels", f"the run's DP is {level}-level, not one of {list(p.levels)}"))
    if p.max_delta and run.delta > p.max_delta:
        out.append(Violation("privacy.max_delta", f"the run's delta {run.delta:g} is above {p.max_delta:g}"))
    noise, clip = ((run.noise_multiplier, run.max_grad_norm) if level == RECORD
                   else (run.user_noise_multiplier, run.update_clip_norm))
    if p.min_noise_multiplier and noise is not None and noise < p.min_noise_multiplier:
        out.append(Violation("privacy.min_noise_multiplier", f"the run's noise multiplier {noise:g} is below "
                                                             f"{p.min_noise_multiplier:g}"))
    if p.max_clip_norm and clip > p.max_clip_norm:
        out.append(Violation("privacy.max_clip_norm", f"the run's clip norm {clip:g} is above {p.max_clip_norm:g}"))
    budget = run.budget_for(site, local_budget) if level == RECORD else None
    if level == RECORD and (p.max_epsilon_per_run or p.max_epsilon_lifetime) and budget is None:
        out.append(Violation("privacy.max_epsilon_per_run", "the run names no epsilon budget"))
    elif budget is not None:
        if p.max_epsilon_per_run and budget > p.max_epsilon_per_run:
            out.append(Violation("privacy.max_epsilon_per_run", f"the run's budget epsilon={budget:g} is above "
                                                                f"{p.max_epsilon_per_run:g}"))
        spent = history.epsilon_committed(excluding=run_id) if history is not None else 0.0
        if p.max_epsilon_lifetime and spent + budget > p.max_epsilon_lifetime:
            out.append(Violation("privacy.max_epsilon_lifetime", f"epsilon {spent:g} already committed to earlier "
                                                                 f"runs plus this run's {budget:g} is above "
                                                                 f"{p.max_epsilon_lifetime:g}"))
    return out


def check_noise(policy: SitePolicy, noise_multiplier: float | None) -> list[Violation]:
    """The noise multiplier this site derived for a run that names only a target epsilon (the run
    config cannot be checked for it at join: the site computes it from its own sample count)."""
    least = policy.privacy.min_noise_multiplier
    if least and noise_multiplier is not None and noise_multiplier < least:
        return [Violation("privacy.min_noise_multiplier", f"the run's target epsilon gives this site a noise "
                                                          f"multiplier of {noise_multiplier:.4g}, below {least:g}")]
    return []


def check_assignment(policy: SitePolicy, config: RunConfig, *, round_no: int, secure: bool, roster_size: int
                     ) -> list[Violation]:
    """The settings of one round: the coordinator may not weaken what was agreed at join."""
    out = []
    if policy.secagg.required and not secure:
        out.append(Violation("secagg.required", f"round {round_no} is a plain upload, not secure aggregation"))
    if secure:
        out += check_roster(policy, config, roster_size, f"round {round_no}")
    limit = policy.limits.max_rounds_per_run
    if limit and round_no > limit:
        out.append(Violation("limits.max_rounds_per_run", f"round {round_no} is past {limit} rounds"))
    return out


def check_roster(policy: SitePolicy, config: RunConfig, n: int, where: str) -> list[Violation]:
    """A SecAgg roster (or survivor set) of n sites, and the threshold t it implies."""
    s, out = policy.secagg, []
    if s.min_sites and n < s.min_sites:
        out.append(Violation("secagg.min_sites", f"{where}: {n} participants, fewer than {s.min_sites}"))
    if s.max_sites and n > s.max_sites:
        out.append(Violation("secagg.max_sites", f"{where}: {n} participants, more than {s.max_sites}"))
    if s.min_threshold:
        from security.secagg import SecAggProtocolSettings
        t = SecAggProtocolSettings.from_section(config.secagg).threshold_for(max(n, 1))
        if t < s.min_threshold:
            out.append(Violation("secagg.min_threshold", f"{where}: threshold t={t} is below {s.min_threshold}"))
    return out


class RunHistory:
    """The runs this site joined (STATE/policy-runs.json): the runs-per-day limit and the epsilon
    committed over the site's lifetime (each run's whole budget, as the ledger may not have spent
    it yet)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.runs = json.loads(self.path.read_text())["runs"] if self.path.exists() else []
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{self.path}: damaged run history: {err}") from None

    def runs_since(self, since: float, excluding: str = "") -> int:
        return sum(1 for r in self.runs if r["joined"] >= since and r["run_id"] != excluding)

    def epsilon_committed(self, excluding: str = "") -> float:
        return sum(float(r.get("epsilon") or 0.0) for r in self.runs if r["run_id"] != excluding)

    def record(self, run_id: str, epsilon: float | None) -> None:
        if any(r["run_id"] == run_id for r in self.runs):
            return
        self.runs.append({"run_id": run_id, "joined": time.time(), "epsilon": epsilon})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"runs": self.runs}))
        tmp.replace(self.path)


def check_coordinator(policy: SitePolicy, address: str, tls, timeout: float = 10.0) -> list[Violation]:
    """The coordinator this site talks to: the CA it trusts, by fingerprint, and the name on the
    certificate the coordinator presents (read in a TLS handshake of its own, since gRPC does not
    show the peer certificate to a client). Raises OSError when the coordinator is unreachable."""
    rules, out = policy.coordinator, []
    if tls is None:
        return [Violation("coordinator.name", "a plaintext channel (--insecure) names no coordinator")] \
            if (rules.name or rules.ca_sha256) else []
    if rules.ca_sha256:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding
        der = x509.load_pem_x509_certificate(Path(tls.ca_cert).read_bytes()).public_bytes(Encoding.DER)
        if (found := hashlib.sha256(der).hexdigest()) != rules.ca_sha256:
            out.append(Violation("coordinator.ca_sha256", f"the CA {tls.ca_cert} has fingerprint {found}, "
                                                          f"not {rules.ca_sha256}"))
    if rules.name and not out:
        name = peer_certificate_name(address, tls, timeout)
        if name != rules.name:
            out.append(Violation("coordinator.name", f"the coordinator at {address} presents a certificate for "
                                                     f"{name!r}, not {rules.name!r}"))
    return out


def peer_certificate_name(address: str, tls, timeout: float) -> str:
    import socket
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from security.pki import identity_from_pem
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
    ctx.check_hostname = False   # gRPC checks the address; this handshake reads the name
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=timeout) as sock, \
            ctx.wrap_socket(sock, server_hostname=host) as conn:
        der = conn.getpeercert(binary_form=True)
    return identity_from_pem(x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)).name
