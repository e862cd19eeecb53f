"""A site's `[distill]` section: what to distill, from which teacher, how, and where to put it.

    [distill]
    task = "text"                      # text | nav
    teacher = "teacher.safetensors"    # the site's teacher (relative to the config file); for nav the
                                       # site's federated model, STATE/adapted-<run>.safetensors
    method = "mixkd"                   # mixkd | kd | none
    alpha = 0.4                        # λ ~ Beta(alpha, alpha)
    temperature = 2.0
    epochs = 3                         # nav: 10
    batch_size = 32
    lr = 1e-4                          # nav: 3e-3
    device = "auto"                    # auto | cpu | cuda
    data_fraction = 1.0                # of the site's training data the student sees
    out_dir = "distill"                # the student, its report and curves stay here, on the site
    processes = 1                      # DDP processes on this machine (torchrun sets its own)

    [distill.weights]                  # ce, kd, mix_kd, mix_ce
    [distill.student]                  # layers, hidden, vocab, init = "pretrained" | "teacher"
    [distill.data]                     # text: csv, text_column, label_column, max_samples, test_fraction, max_len
    [distill.teacher_finetune]         # text: epochs, lr, batch_size (for --finetune-teacher)
    [distill.dp]                       # enabled, noise_multiplier, max_grad_norm
    [distill.nav]                      # nav: backbone, demo_cache, student_d_model, student_cross_layers;
                                       # levels, site_index, episodes, eval_episodes default to the teacher's run

Every error names its field (`distill.alpha: must be > 0 ...`); unknown keys are errors too, since
a misspelt key silently ignored is a setting the site believes it has and does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from kt_core.distill.bert import StudentSpec
from kt_core.distill.device import DEVICE_CHOICES
from kt_core.config_file import ConfigError, coerce, load_table
from kt_core.distill.mixkd import DistillConfig, LossWeights
from kt_core.distill.text import TextDataError, TextDataSpec

TASKS = ("text", "nav")
STUDENT_INITS = ("pretrained", "teacher")


@dataclass(frozen=True)
class TeacherFinetune:
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 32


@dataclass(frozen=True)
class DPOptions:
    enabled: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class SiteDistillConfig:
    task: str
    teacher: Path
    train: DistillConfig
    student: StudentSpec
    student_init: str = "pretrained"
    data: TextDataSpec = field(default_factory=TextDataSpec)
    out_dir: Path = Path("distill")
    processes: int = 1
    teacher_finetune: TeacherFinetune = TeacherFinetune()
    dp: DPOptions = DPOptions()
    nav: dict = field(default_factory=dict)  # the navigation task's own settings (kt_core.distill.nav)

    def with_device(self, device: str) -> "SiteDistillConfig":
        return replace(self, train=replace(self.train, device=device))


TEXT_DEFAULTS = (3, 1e-4)     # epochs, lr
NAV_DEFAULTS = (10, 3e-3)

_TOP = {"task", "teacher", "method", "alpha", "temperature", "epochs", "batch_size", "lr", "weight_decay", "warmup",
        "max_grad_norm", "seed", "device", "amp", "data_fraction", "out_dir", "processes", "weights", "student",
        "data", "teacher_finetune", "dp", "nav"}


def load_site_config(path: Path) -> SiteDistillConfig:
    doc = load_table(path, "distillation config")
    if "distill" not in doc:
        raise ConfigError(f"distill: {path} has no [distill] section")
    return parse_distill(doc["distill"], base=path.parent)


def parse_distill(section: Mapping[str, Any], base: Path = Path(".")) -> SiteDistillConfig:
    """The validated settings; relative paths are taken from `base` (the config file's folder)."""
    if not isinstance(section, Mapping):
        raise ConfigError("distill: must be a table")
    _unknown("distill", section, _TOP)
    get = _Getter("distill", section)
    task = get.choice("task", TASKS, "text")
    teacher = get.text("teacher", None)
    if not teacher:
        raise ConfigError("distill.teacher: required (the path of the site's teacher checkpoint)")
    train = _training(get, task)
    student, init = _student(get)
    data = _text_data(get, base, train.seed)
    finetune = _teacher_finetune(get)
    dp = _dp_options(get, train.method)
    nav = dict(get.table("nav"))
    for key in ("backbone", "demo_cache"):   # paths, like teacher, relative to the config file
        if isinstance(nav.get(key), str):
            nav[key] = str(_path(base, nav[key]))
    if task == "nav":
        from kt_core.distill.nav import NavOptions  # pulls in the VLN backbone: only when asked for

        NavOptions.from_table(nav)
        if dp.enabled:
            raise ConfigError("distill.dp: not supported for task \"nav\" yet: the VLN backbone reads its "
                                     "position tables directly, which Opacus cannot differentiate per sample")
    elif nav:
        raise ConfigError("distill.nav: only for task = \"nav\"")
    processes = get.integer("processes", 1)
    if processes < 1:
        raise ConfigError(f"distill.processes: must be >= 1, got {processes}")
    return SiteDistillConfig(task=task, teacher=_path(base, teacher), train=train, student=student, student_init=init,
                             data=data, out_dir=_path(base, get.text("out_dir", "distill")), processes=processes,
                             teacher_finetune=finetune, dp=dp, nav=nav)


def _training(get: "_Getter", task: str) -> DistillConfig:
    weights_tab = get.table("weights")
    _unknown("distill.weights", weights_tab, {"ce", "kd", "mix_kd", "mix_ce"})
    wg = _Getter("distill.weights", weights_tab)
    weights = LossWeights(**{k: wg.number(k, getattr(LossWeights(), k)) for k in ("ce", "kd", "mix_kd", "mix_ce")})
    # A text student starts from pretrained MiniLM layers and needs a light touch; a navigation
    # student starts from scratch on a few hundred demonstrations and needs far more (bench/distill.py).
    epochs, lr = NAV_DEFAULTS if task == "nav" else TEXT_DEFAULTS
    train = DistillConfig(method=get.choice("method", ("mixkd", "kd", "none"), "mixkd"),
                          alpha=get.number("alpha", 0.4), temperature=get.number("temperature", 2.0), weights=weights,
                          epochs=get.integer("epochs", epochs), batch_size=get.integer("batch_size", 32),
                          lr=get.number("lr", lr), weight_decay=get.number("weight_decay", 0.01),
                          warmup=get.number("warmup", 0.1), max_grad_norm=get.number("max_grad_norm", 1.0),
                          seed=get.integer("seed", 0), device=get.text("device", "auto"), amp=get.boolean("amp", True))
    try:
        train.validate()
    except ConfigError as err:
        raise ConfigError(f"distill.{err}") from None
    device = train.device.lower()
    if device not in DEVICE_CHOICES and not device.startswith("cuda:"):
        raise ConfigError(f"distill.device: {train.device!r} is not one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    return train


def _student(get: "_Getter") -> tuple[StudentSpec, str]:
    st_tab = get.table("student")
    _unknown("distill.student", st_tab, {"layers", "hidden", "vocab", "init", "max_positions", "dropout"})
    sg = _Getter("distill.student", st_tab)
    hidden = sg.integer("hidden", 0)
    student = StudentSpec(layers=sg.integer("layers", 2), hidden=hidden or None, vocab=sg.integer("vocab", 0),
                          max_positions=sg.integer("max_positions", 128), dropout=sg.number("dropout", 0.1))
    try:
        student.validate()
    except ValueError as err:
        raise ConfigError(f"distill.{err}") from None
    init = sg.choice("init", STUDENT_INITS, "pretrained")
    return student, init


def _text_data(get: "_Getter", base: Path, seed: int) -> TextDataSpec:
    data_tab = get.table("data")
    _unknown("distill.data", data_tab, {"csv", "text_column", "label_column", "max_samples", "test_fraction", "max_len"})
    dg = _Getter("distill.data", data_tab)
    csv = dg.text("csv", None)
    data = TextDataSpec(csv=_path(base, csv) if csv else None, text_column=dg.text("text_column", "text"),
                        label_column=dg.text("label_column", "sentiment"), max_samples=dg.integer("max_samples", 0),
                        test_fraction=dg.number("test_fraction", 0.2), data_fraction=get.number("data_fraction", 1.0),
                        max_len=dg.integer("max_len", 64), seed=seed)
    try:
        data.validate()
    except TextDataError as err:
        raise ConfigError(f"distill.{err}") from None
    return data


def _teacher_finetune(get: "_Getter") -> TeacherFinetune:
    ft_tab = get.table("teacher_finetune")
    _unknown("distill.teacher_finetune", ft_tab, {"epochs", "lr", "batch_size"})
    fg = _Getter("distill.teacher_finetune", ft_tab)
    finetune = TeacherFinetune(epochs=fg.integer("epochs", 2), lr=fg.number("lr", 1e-4), batch_size=fg.integer("batch_size", 32))
    if finetune.epochs < 1 or finetune.batch_size < 1 or finetune.lr <= 0:
        raise ConfigError("distill.teacher_finetune: epochs and batch_size must be >= 1 and lr > 0")
    return finetune


def _dp_options(get: "_Getter", method: str) -> DPOptions:
    dp_tab = get.table("dp")
    _unknown("distill.dp", dp_tab, {"enabled", "noise_multiplier", "max_grad_norm"})
    pg = _Getter("distill.dp", dp_tab)
    dp = DPOptions(enabled=pg.boolean("enabled", False), noise_multiplier=pg.number("noise_multiplier", 1.0),
                   max_grad_norm=pg.number("max_grad_norm", 1.0))
    if dp.enabled:
        if dp.noise_multiplier < 0 or dp.max_grad_norm <= 0:
            raise ConfigError("distill.dp: noise_multiplier must be >= 0 and max_grad_norm > 0")
        if method == "mixkd":
            # one mixed example carries two records: a per-sample clip no longer bounds one record's influence
            raise ConfigError("distill.dp: DP-SGD with method \"mixkd\" is refused: each mixed example "
                                     "depends on two records, so per-example clipping does not bound one record's "
                                     "influence; use method \"kd\" or \"none\" with DP")
    return dp


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _unknown(where: str, table: Mapping, allowed: set[str]) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ConfigError(f"{where}.{extra[0]}: unknown setting (known: {', '.join(sorted(allowed))})")


class _Getter:
    """Typed reads from one TOML table, each error naming `where.key`."""

    def __init__(self, where: str, table: Mapping):
        self.where, self.values = where, table

    def _get(self, key, default):
        return self.values.get(key, default)

    def fail(self, key: str, text: str):
        raise ConfigError(f"{self.where}.{key}: {text}")

    def _typed(self, hint: type, key: str, default):
        return coerce(hint, self._get(key, default), f"{self.where}.{key}")

    def number(self, key: str, default: float) -> float:
        return self._typed(float, key, default)

    def integer(self, key: str, default: int) -> int:
        return self._typed(int, key, default)

    def boolean(self, key: str, default: bool) -> bool:
        return self._typed(bool, key, default)

    def text(self, key: str, default: str | None) -> str | None:
        return None if self._get(key, default) is None else self._typed(str, key, default)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        v = self.text(key, default)
        if v not in choices:
            self.fail(key, f"{v!r} is not one of {', '.join(choices)}")
        return v

    def table(self, key: str) -> Mapping:
        v = self._get(key, {})
        if not isinstance(v, Mapping):
            self.fail(key, "must be a table")
        return v
