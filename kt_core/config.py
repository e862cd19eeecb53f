"""The run configuration: one TOML file, validated field by field.

The coordinator loads it (from a file or an operator's StartRun), resolves what depends on the
data set, and hands the resulting JSON to every participant at join, so all sites build the same
model from the same seed. Every error names the offending field, e.g. `train.lr: must be > 0`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kt_core.bounded import MAX_TOML_DEPTH, BoundedInputError, loads_json
from kt_core.adapters import AdapterSettings
from kt_core.config_file import ConfigError, build, check_known, parse_toml, read_text
from kt_core.data import PartitionSpec
from kt_core.models import ModelConfig
from kt_core.train import TrainConfig
from kt_core.vln.adapt import AdapterConfig

# Input and output sizes of the image tasks, so the coordinator can build the model without data.
DATASET_SHAPES = {"fashion-mnist": (784, 10), "digits": (64, 10)}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class FederationSettings:
    rounds: int = 5
    min_sites: int = 2
    max_sites: int = 100
    round_timeout_s: float = 120.0
    # How long a round waits for the run's other sites once min_sites are connected.
    gather_timeout_s: float = 5.0
    # The sites of this run, in order: only these may join, and the data partition is laid out over them.
    sites: tuple[str, ...] = ("site-a", "site-b", "site-c")
    seed: int = 0
    max_chunk_bytes: int = 1024 * 1024
    server_lr: float = 1.0
    # Back-pressure at the coordinator (coordinator/limits.py); a refusal names the field it hit.
    max_concurrent_uploads: int = 16       # uploads received at once; one more waits, then is refused
    upload_queue_timeout_s: float = 10.0   # how long an upload waits for a slot (0: refuse at once)
    max_rpcs_per_site: int = 8        # calls one site may hold open, its assignment stream included
    rpc_rate_per_site: float = 50.0   # calls per second one site may start (0: no limit)
    # An aborted attempt is retried at most max_attempts - 1 times, waiting retry_backoff_s before
    # the first retry and twice as long before each next one (at most 60 s); then the run fails.
    max_attempts: int = 10
    retry_backoff_s: float = 1.0

    def validate(self) -> None:
        if self.rounds < 1:
            raise ValueError("rounds: must be >= 1")
        if not 1 <= self.min_sites <= self.max_sites:
            raise ValueError("min_sites: must be between 1 and max_sites")
        if not (math.isfinite(self.round_timeout_s) and self.round_timeout_s > 0):
            raise ValueError("round_timeout_s: must be a finite number > 0")
        if not (math.isfinite(self.gather_timeout_s) and self.gather_timeout_s >= 0):
            raise ValueError("gather_timeout_s: must be a finite number >= 0")
        # each round's task seed is seed * 100003 + round, sent as a uint64 and used to seed numpy
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed: must be between 0 and {MAX_SEED}")
        if not self.sites or len(set(self.sites)) != len(self.sites):
            raise ValueError("sites: must be a non-empty list of distinct names")
        if self.min_sites > len(self.sites):
            raise ValueError("min_sites: larger than the number of sites")
        if not 1024 <= self.max_chunk_bytes <= 4 * 1024 * 1024:
            raise ValueError("max_chunk_bytes: must be between 1 KiB and 4 MiB")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError("server_lr: must be a finite number > 0")
        if not 1 <= self.max_concurrent_uploads <= 4096:
            raise ValueError("max_concurrent_uploads: must be between 1 and 4096")
        if not (math.isfinite(self.upload_queue_timeout_s) and self.upload_queue_timeout_s >= 0):
            raise ValueError("upload_queue_timeout_s: must be a finite number >= 0")
        if not 2 <= self.max_rpcs_per_site <= 1024:
            raise ValueError("max_rpcs_per_site: must be between 2 and 1024 (a site holds its "
                             "assignment stream and one download or upload at once)")
        if not (math.isfinite(self.rpc_rate_per_site) and self.rpc_rate_per_site >= 0):
            raise ValueError("rpc_rate_per_site: must be a finite number >= 0 (0: no limit)")
        if not 1 <= self.max_attempts <= 1000:
            raise ValueError("max_attempts: must be between 1 and 1000 (tries of one round before the run fails)")
        if not (math.isfinite(self.retry_backoff_s) and 0 <= self.retry_backoff_s <= 3600):
            raise ValueError("retry_backoff_s: must be a finite number between 0 and 3600")


@dataclass(frozen=True)
class DataSettings:
    dataset: str = "auto"          # auto | fashion-mnist | digits
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    max_train: int = 0             # per data set before partitioning; 0 = all
    max_test: int = 0

    def validate(self) -> None:
        if self.dataset not in ("auto", *DATASET_SHAPES):
            raise ValueError(f"dataset: unknown data set {self.dataset!r} "
                             f"(choose auto, {', '.join(DATASET_SHAPES)})")
        if self.max_train < 0 or self.max_test < 0:
            raise ValueError("max_train: must be >= 0")
        self.partition.validate()
        # the image task's partition (the only task that reads it): a site cannot hold more classes
        # than the data set has, and the coordinator can say so before any site builds anything
        classes = min(DATASET_SHAPES[d][1] for d in (DATASET_SHAPES if self.dataset == "auto" else [self.dataset]))
        if self.partition.scheme == "shards" and self.partition.classes_per_site > classes:
            raise ValueError(f"partition.classes_per_site: {self.partition.classes_per_site} exceeds the {classes} "
                             f"classes of {self.dataset if self.dataset != 'auto' else 'the data sets'}")


PRIVACY_MECHANISMS = ("dp_sgd", "central", "distributed")
GRAD_SAMPLE_MODES = ("hooks", "ew", "functorch")
ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class PrivacySettings:
    """`[privacy]`: differential privacy (off unless `enabled`). See README "Differential privacy".

    mechanism "dp_sgd": record-level DP-SGD at every site (Opacus), each site accounting its own epsilon
    in its ledger and refusing rounds past its budget. "central" / "distributed": user-level
    DP-FedAvg, sites clip their whole update to `update_clip_norm`; the noise (multiplier
    `user_noise_multiplier`) is added by the coordinator (central) or as shares by the sites
    (distributed; a guarantee only with secure aggregation, see security/dp/user_level.py).
    """
    enabled: bool = False
    mechanism: str = "dp_sgd"
    # give either target_epsilon (over the whole run, at delta; each site derives its noise
    # multiplier from its own N) or noise_multiplier
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5                      # must be < 1/N at every site (checked there)
    max_grad_norm: float = 1.0               # per-sample clip norm
    grad_sample_mode: str = "hooks"          # hooks | ew | functorch
    accountant: str = "prv"                  # primary; the other one is the cross-check
    # the budget every site enforces (default: target_epsilon); a site may set a stricter one
    # locally (`ktfed participant run --epsilon-budget`), and the stricter one wins
    epsilon_budget: float | None = None
    site_budgets: dict[str, float] = field(default_factory=dict)
    poisson_sampling: bool = True
    # fixed shuffled batches void the Poisson accounting: refused unless acknowledged here
    acknowledge_unaccounted_sampling: bool = False
    max_physical_batch_size: int = 128       # BatchMemoryManager split of the logical batch
    # user-level (central / distributed)
    update_clip_norm: float = 1.0
    user_noise_multiplier: float = 1.0
    min_survivors: int = 2                   # distributed: honest survivors the noise is calibrated for

    def validate(self) -> None:
        def positive(name, value):
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")

        if self.mechanism not in PRIVACY_MECHANISMS:
            raise ValueError(f"mechanism: {self.mechanism!r} is not one of {list(PRIVACY_MECHANISMS)}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode: {self.grad_sample_mode!r} is not one of {list(GRAD_SAMPLE_MODES)}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant: {self.accountant!r} is not one of {list(ACCOUNTANTS)}")
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            raise ValueError(f"delta: must be in (0, 1) and far below 1/N of every site, got {self.delta!r}")
        positive("max_grad_norm", self.max_grad_norm)
        positive("update_clip_norm", self.update_clip_norm)
        positive("user_noise_multiplier", self.user_noise_multiplier)
        if isinstance(self.max_physical_batch_size, bool) or self.max_physical_batch_size < 1:
            raise ValueError("max_physical_batch_size: must be a positive integer")
        if isinstance(self.min_survivors, bool) or self.min_survivors < 1:
            raise ValueError("min_survivors: must be a positive integer")
        for site, budget in self.site_budgets.items():
            positive(f"site_budgets.{site}", budget)
        if self.epsilon_budget is not None:
            positive("epsilon_budget", self.epsilon_budget)
        if not self.enabled:
            return
        if self.mechanism == "dp_sgd":
            if (self.target_epsilon is None) == (self.noise_multiplier is None):
                raise ValueError("target_epsilon: give exactly one of target_epsilon and noise_multiplier")
            if self.target_epsilon is not None:
                positive("target_epsilon", self.target_epsilon)
            if self.noise_multiplier is not None:
                positive("noise_multiplier", self.noise_multiplier)
                if self.epsilon_budget is None and not self.site_budgets:
                    raise ValueError("epsilon_budget: required when noise_multiplier is given "
                                     "(the budget each site enforces)")
            if not self.poisson_sampling and not self.acknowledge_unaccounted_sampling:
                raise ValueError("poisson_sampling: false voids the accountants' guarantee (they assume "
                                 "Poisson sampling); set acknowledge_unaccounted_sampling = true to train anyway")

    def budget_for(self, site: str, local: float | None = None) -> float | None:
        """The budget `site` enforces: the run's (its per-site entry, else epsilon_budget, else
        target_epsilon) and the site's own local one: the stricter wins."""
        run_budget = self.site_budgets.get(site)
        if run_budget is None:
            run_budget = self.epsilon_budget if self.epsilon_budget is not None else self.target_epsilon
        budgets = [b for b in (run_budget, local) if b is not None]
        return min(budgets) if budgets else None


TASK_KINDS = ("image", "vln", "python")
_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class TaskSettings:
    """`[task]`: what the federation learns. "image": the MLP of [model] on the image data set of
    [data]. "vln": adapters ([vln.adapter]) on the pretrained navigation backbone the coordinator
    hosts, on BabyAI demonstrations of each site's levels ([vln]). "python": a federation's own
    task (kt_core.task_api), named by `entry` and installed at the coordinator and every site, its
    `[task.options]` validated by the task's Options, its adapters placed by `[task.adapter]` on
    each site's own data (`ktfed participant run --site-data`). All three are FederatedTasks
    (kt_core.task_api). The coordinator fills in `version` (when not given) as the run starts, and
    for a python task `options_sha256` and `model_sha256`; sites check them before building."""
    kind: str = "image"
    entry: str = ""                 # python: "package.module:Class"
    version: str = ""               # the task version every site must have installed (any kind)
    labels_sha256: str = ""         # python, optional: kt_core.site_data.labels_sha256 of the label names
    options_sha256: str = ""        # python: filled in by the coordinator
    model_sha256: str = ""          # python: digest of the adapted model's frozen tensors, filled in likewise
    options: dict[str, Any] = field(default_factory=dict)   # python: validated by the task's Options
    adapter: AdapterSettings = field(default_factory=AdapterSettings)

    def validate(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {list(TASK_KINDS)}")
        if self.kind == "python" and not self.entry:
            raise ValueError('entry: required for kind "python" (package.module:Class of the installed task)')
        if self.kind != "python":
            given = [n for n in ("entry", "labels_sha256", "options_sha256", "model_sha256", "options")
                     if getattr(self, n)] + (["adapter"] if self.adapter != AdapterSettings() else [])
            if given:
                raise ValueError(f'{given[0]}: only for kind "python", the run\'s task is {self.kind!r}')
        if len(self.version) > 100:
            raise ValueError("version: at most 100 characters")
        for name in ("labels_sha256", "options_sha256", "model_sha256"):
            value = getattr(self, name)
            if value and (len(value) != 64 or set(value) - _HEX):
                raise ValueError(f"{name}: must be a SHA-256 hex digest (64 lower-case hex digits), got {value!r}")


def _task_section(table: Any) -> TaskSettings:
    """`[task]`: its `options` are the task's own (checked by its Options class when the task is
    loaded), so here they are only required to be a table of JSON values, bounded like the file."""
    options = table.get("options", {}) if isinstance(table, dict) else {}
    if not isinstance(options, dict):
        raise ConfigError(f"task.options: expected a table, got {type(options).__name__}")
    _check_json_value(options, "task.options")
    rest = {k: v for k, v in table.items() if k != "options"} if isinstance(table, dict) else table
    settings = build(TaskSettings, rest, "task", skip=("options",))
    if options and settings.kind != "python":
        raise ConfigError(f'task.options: only for kind "python", the run\'s task is {settings.kind!r}')
    return dataclasses.replace(settings, options=dict(options))


def _check_json_value(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json_value(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    elif not isinstance(value, (str, int, float, bool)):
        raise ConfigError(f"{where}: {type(value).__name__} values are not supported (strings, numbers, "
                          "booleans, lists and tables are)")


MAX_EPISODES = 10_000   # per level, of any kind in [vln]


@dataclass(frozen=True)
class VLNSettings:
    """`[vln]`: the navigation task. Levels are dealt round-robin over the sites (non-IID: each
    site holds different levels); evaluation uses unseen seeds of a site's levels and the levels
    no site trains on (`held_out_levels`)."""
    backbone: str = ""                 # at the coordinator: the checkpoint `ktfed pretrain` wrote
    backbone_sha256: str = ""          # filled in by the coordinator when the run starts
    levels: tuple[str, ...] = ("BabyAI-GoToObj-v0", "BabyAI-GoToLocal-v0", "BabyAI-GoToObjDoor-v0")
    held_out_levels: tuple[str, ...] = ("BabyAI-GoToRedBlueBall-v0",)
    episodes_per_level: int = 150      # a site's bot demonstrations per level
    eval_episodes: int = 20            # unseen demonstrations per level for the per-round accuracy
    rollout_episodes: int = 20         # unseen seeds per level rolled out at the end of the run (0: none)
    round_rollout_episodes: int = 0    # ... and after every round, reported as its success_rate (0: none)
    cache_dir: str = ""                # a site's demonstration cache ("": STATE/demos)
    memory: int = 0                    # past steps the backbone must see (kt_core.vln.memory); checked on load
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    def validate(self) -> None:
        if not self.levels or len(set(self.levels)) != len(self.levels):
            raise ValueError("levels: must be a non-empty list of distinct BabyAI level names")
        if set(self.levels) & set(self.held_out_levels):
            raise ValueError("held_out_levels: a held-out level must not be one the sites train on")
        # bounded: the run config comes from a coordinator the site need not trust, and each episode
        # costs the site a bot run or a rollout
        for name, lo in (("episodes_per_level", 1), ("eval_episodes", 1), ("rollout_episodes", 0),
                         ("round_rollout_episodes", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= MAX_EPISODES:
                raise ValueError(f"{name}: must be an integer between {lo} and {MAX_EPISODES}, got {value!r}")
        from kt_core.vln.backbone import MAX_MEMORY

        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or not 0 <= self.memory <= MAX_MEMORY:
            raise ValueError(f"memory: must be an integer between 0 and {MAX_MEMORY}, got {self.memory!r}")
        if self.backbone_sha256 and (len(self.backbone_sha256) != 64
                                     or any(c not in "0123456789abcdef" for c in self.backbone_sha256)):
            raise ValueError("backbone_sha256: must be a SHA-256 hex digest (the coordinator fills it in)")


@dataclass(frozen=True)
class SecAggConfig:
    """`[secagg]`: secure aggregation (Bonawitz et al. 2017; see security/secagg and README).

    The coordinator learns only the sum of the contributors' updates. Each site clips its whole
    update to `clip_norm` (L2), weights it by min(its sample count, `max_samples_per_site`) /
    `max_samples_per_site` so the weighted mean is recoverable from the sum, and hides its count
    inside the masked vector. Without secure aggregation the coordinator applies the same two
    bounds to every plain upload itself (RunConfig.max_weight, max_update_norm), so the mean is the
    same either way and no site can weigh or pull more than they allow. The protocol's own checks
    (threshold a strict majority, no overflow
    in Z_2^32) are made by security.secagg when the run starts and by `ktfed config check`; the
    protocol's part of this section becomes its settings in one place,
    `security.secagg.SecAggProtocolSettings.from_section`.
    """
    enabled: bool = False
    threshold: int = 0                 # Shamir t; 0 = automatic (strict majority of the holders)
    neighbours: int = 0                # SecAgg+ neighbour count k; 0 = complete graph
    # L2 clip of each whole update, by the sites under secure aggregation and by the coordinator
    # otherwise (RunConfig.max_update_norm). 100, not 10: honest WAFFLe updates of the image task
    # measure 17-36 a round (the image demo's recipe), navigation's 1-4; at 10 an honest image
    # update was scaled down to a third. At 16 fractional bits it leaves SecAgg room for 327 sites
    # (security.secagg.quantize.check_capacity refuses more, naming clip_norm and bits).
    clip_norm: float = 100.0
    bits: int = 16                     # fractional bits of the fixed-point encoding
    active: bool = False               # signed key advertisements and consistency acks
    max_samples_per_site: int = 10_000
    step_timeout_s: float = 30.0       # how long each step after the masked input waits

    def validate(self) -> None:
        if isinstance(self.max_samples_per_site, bool) or self.max_samples_per_site < 1:
            raise ValueError("max_samples_per_site: must be a positive integer")
        if not (math.isfinite(self.step_timeout_s) and self.step_timeout_s > 0):
            raise ValueError("step_timeout_s: must be > 0")
        if not (isinstance(self.clip_norm, (int, float)) and math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm: must be a finite number > 0, got {self.clip_norm!r}")


@dataclass(frozen=True)
class RunConfig:
    federation: FederationSettings = field(default_factory=FederationSettings)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataSettings = field(default_factory=DataSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    task: TaskSettings = field(default_factory=TaskSettings)
    vln: VLNSettings = field(default_factory=VLNSettings)

    def resolved(self) -> "RunConfig":
        """Fix what 'auto' means and size the model for the data set; pin the installed task's
        version, and for a python task its options digest and frozen-model digest
        (kt_core.python_task.pinned)."""
        name = self.data.dataset
        if name == "auto":
            name = "fashion-mnist" if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file() else "digits"
        input_dim, num_classes = DATASET_SHAPES[name]
        config = dataclasses.replace(
            self, data=dataclasses.replace(self.data, dataset=name),
            model=dataclasses.replace(self.model, input_dim=input_dim, num_classes=num_classes))
        if config.task.kind == "python":
            from kt_core.python_task import pinned   # imports the task: only for a run that names one

            config = pinned(config)
        elif not config.task.version:   # a built-in task: its version, so a site of another release refuses
            from kt_core.task_runner import task_class

            config = dataclasses.replace(config, task=dataclasses.replace(
                config.task, version=task_class(config)[1].version))
        return config

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def max_weight(self) -> int:
        """The most one site's update weighs in the mean: min(its sample count, this). Under secure
        aggregation the site applies it (w / max_weight times its update, w carried masked); in a
        plain upload the coordinator does, so the weighted mean is the same with or without
        masking, and a site that claims 2^53 - 1 samples weighs no more than one that claims 10,000.
        User-level DP weighs every site equally (1), as its sensitivity analysis assumes."""
        if self.privacy.enabled and self.privacy.mechanism in ("central", "distributed"):
            return 1
        return self.secagg.max_samples_per_site

    def max_update_norm(self) -> float:
        """The L2 norm one site's whole update is clipped to before it is averaged: the user-level
        DP clip (`privacy.update_clip_norm`) under user-level DP, else `secagg.clip_norm`. Under
        secure aggregation the sites clip (the coordinator cannot see an update); in a plain upload
        the coordinator clips every update itself, so a site that skips its own clip, or scales its
        update by 10^6, moves the mean no further than an honest one could."""
        if self.privacy.enabled and self.privacy.mechanism in ("central", "distributed"):
            return self.privacy.update_clip_norm
        return self.secagg.clip_norm

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        try:
            table = loads_json(text, max_depth=MAX_TOML_DEPTH, what="run config JSON")
        except json.JSONDecodeError as err:
            raise ConfigError(f"run config JSON: {err}") from None
        except (BoundedInputError, UnicodeDecodeError) as err:
            raise ConfigError(str(err)) from None
        return from_table(table)


SECTIONS = {"federation": FederationSettings, "model": ModelConfig, "train": TrainConfig, "data": DataSettings,
            "privacy": PrivacySettings, "secagg": SecAggConfig, "task": TaskSettings, "vln": VLNSettings}


def from_table(table: Any) -> RunConfig:
    check_known(table, SECTIONS, "", kind="section")
    return RunConfig(**{name: _task_section(table.get(name, {})) if cls is TaskSettings
                        else build(cls, table.get(name, {}), name) for name, cls in SECTIONS.items()})


ENV_OVERRIDE_PREFIX = "KTFED_RUN__"


def load_toml(text: str, source: str = "<config>", environ: Mapping[str, str] | None = None) -> RunConfig:
    """Parse and validate; with `environ`, `KTFED_RUN__SECTION__FIELD=value` variables override the
    file's fields (e.g. KTFED_RUN__FEDERATION__ROUNDS=10, KTFED_RUN__DATA__PARTITION__ALPHA=0.3),
    and are validated exactly like the file."""
    table = parse_toml(text, source)
    overridden = _apply_env_overrides(table, environ or {})
    if overridden:
        source = f"{source} (with {', '.join(overridden)})"
    try:
        return from_table(table)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _apply_env_overrides(table: dict, environ: Mapping[str, str]) -> list[str]:
    used = []
    for var in sorted(v for v in environ if v.startswith(ENV_OVERRIDE_PREFIX)):
        path = [p.lower() for p in var[len(ENV_OVERRIDE_PREFIX):].split("__")]
        if len(path) < 2 or not all(path):
            raise ConfigError(f"{var}: expected {ENV_OVERRIDE_PREFIX}SECTION__FIELD")
        raw = environ[var]
        try:  # typed as TOML would type it (10, 0.5, true, ["a", "b"]); else a plain string
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = table
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{var}: {'.'.join(path[:-1])} is not a table")
        node[path[-1]] = value
        used.append(var)
    return used


def load_file(path: Path, environ: Mapping[str, str] | None = None) -> RunConfig:
    return load_toml(read_text(path, "run config"), str(path), environ)
