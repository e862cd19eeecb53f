"""A site's own data, declared in the site's own file (never in the coordinator's run config).

A site operator writes a small TOML file and passes it as `ktfed participant run --site-data FILE`:

    [data]
    format = "csv"                 # csv | parquet | image_folder | jsonl
    path = "wine.csv"              # relative to this file's folder, or absolute
    features = ["alcohol", "ash"]  # csv/parquet: numeric columns (omitted: every other column)
    label = "class"                # csv/parquet/jsonl: the label column or field
    labels = ["0", "1", "2"]       # optional: the declared label set (the federation's)

`load_site_data` reads it into a `SiteDataset` (tensors, label indices, a stratified split) that
the run's task turns into its training and test sets. Everything read here is hostile input: the
file may come from an export nobody checked, so every size is bounded before it is read (rows,
columns, bytes, line and text lengths, image sizes), every value is checked (numeric and finite
features, non-empty labels, decodable images of the declared size and mode, JSON that parses),
and every refusal names the file, the field and the row or column: a `ConfigError` for the TOML,
a `SiteDataError` for the data. The readers themselves live in kt_core/site_readers.py.

Label indices must mean the same class at every site, so they index the *sorted* distinct label
names: the declared `labels` when the file has them (a site missing a class must declare the
federation's set), else the names found. `labels_sha256` of those names is what a run config
carries so that sites agree on the set without anyone revealing which labels, or how many
records, a site holds.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from kt_core.config_file import ConfigError, build, check_known, load_table

FORMATS = ("csv", "parquet", "image_folder", "jsonl")
# Defaults a site can raise (up to the ceilings) in its file: the whole set is held in memory.
DEFAULT_MAX_ROWS = 1_000_000
DEFAULT_MAX_BYTES = 1 << 30
CEILING_ROWS = 50_000_000
CEILING_BYTES = 16 << 30
MAX_COLUMNS = 4096
MAX_LABELS = 10_000
MAX_LABEL_CHARS = 200
MAX_IMAGE_SIDE = 4096
IMAGE_CHANNELS = (1, 3, 4)


class SiteDataError(ValueError):
    """A site's data that does not match what its file declares; the message names the data file,
    the field (column) and the row or line."""


@dataclass(frozen=True)
class SiteDataConfig:
    """The `[data]` table of a site's data file."""
    format: str
    path: str
    features: tuple[str, ...] | None = None   # None: every column but the label and `ignore`
    label: str = ""
    ignore: tuple[str, ...] = ()              # columns present but deliberately not used (ids, dates)
    text_field: str = ""
    image_size: tuple[int, ...] = ()          # [height, width]
    channels: int = 3
    test_fraction: float = 0.2
    split_seed: int = 0
    labels: tuple[str, ...] | None = None     # the declared label set
    task: str = ""                            # optional: the task these data are for
    max_rows: int = DEFAULT_MAX_ROWS
    max_bytes: int = DEFAULT_MAX_BYTES

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if not self.path:
            raise ValueError("path: must name the data file or folder")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction: must be between 0 and 1 (exclusive), got {self.test_fraction}")
        if not 1 <= self.max_rows <= CEILING_ROWS:
            raise ValueError(f"max_rows: must be between 1 and {CEILING_ROWS}, got {self.max_rows}")
        if not 1 <= self.max_bytes <= CEILING_BYTES:
            raise ValueError(f"max_bytes: must be between 1 and {CEILING_BYTES}, got {self.max_bytes}")
        if self.labels is not None:
            check_label_names(self.labels, "labels")
        self._validate_format()

    def _validate_format(self) -> None:
        tabular, text, image = self.format in ("csv", "parquet"), self.format == "jsonl", self.format == "image_folder"
        if (tabular or text) and not self.label:
            raise ValueError(f"label: required for format {self.format!r} (the label column or field)")
        if text and not self.text_field:
            raise ValueError("text_field: required for format 'jsonl' (the field holding the text)")
        if self.label and self.label in self.ignore:
            raise ValueError(f"ignore: the label column {self.label!r} cannot be ignored")
        if not tabular and (self.features is not None or self.ignore):
            raise ValueError(f"features: only for csv and parquet, not {self.format!r}")
        if self.features is not None:
            if not self.features or len(self.features) > MAX_COLUMNS:
                raise ValueError(f"features: must list 1 to {MAX_COLUMNS} columns")
            if len(set(self.features)) != len(self.features):
                raise ValueError("features: a column is listed twice")
            if self.label in self.features or set(self.ignore) & set(self.features):
                raise ValueError("features: the label column or an ignored column is listed as a feature")
        if image:
            if len(self.image_size) != 2 or not all(1 <= s <= MAX_IMAGE_SIDE for s in self.image_size):
                raise ValueError(f"image_size: must be [height, width], each 1..{MAX_IMAGE_SIDE}, "
                                 f"got {list(self.image_size)}")
            if self.channels not in IMAGE_CHANNELS:
                raise ValueError(f"channels: must be one of {IMAGE_CHANNELS}, got {self.channels}")
        if not image and (self.image_size or self.channels != 3):
            name = "image_size" if self.image_size else "channels"
            raise ValueError(f"{name}: only for format 'image_folder', not {self.format!r}")


@dataclass(repr=False)
class SiteDataset:
    """One site's data, loaded and checked: stays at the site."""
    format: str
    path: Path
    labels: Tensor                             # int64 indices into label_names
    label_names: tuple[str, ...]               # sorted, distinct
    train_indices: Tensor
    test_indices: Tensor
    features: Tensor | None = None             # float32 [N, F]
    feature_names: tuple[str, ...] = ()
    texts: list[str] | None = None
    images: Tensor | None = None               # float32 [N, C, H, W] in [0, 1]
    source: Path | None = None                 # the site's data file
    task: str = ""

    def __repr__(self) -> str:
        # no counts: a site's number of records is revealed only as the protocol needs it
        return f"SiteDataset(format={self.format!r}, path={str(self.path)!r}, labels={list(self.label_names)})"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def labels_sha256(self) -> str:
        return labels_sha256(self.label_names)

    @property
    def inputs(self) -> Tensor:
        """The features (csv, parquet) or the images (image_folder)."""
        x = self.features if self.features is not None else self.images
        if x is None:
            raise SiteDataError(f"{self.path}: {self.format} data hold texts, not tensors (the task tokenizes them)")
        return x

    def tensor_datasets(self) -> tuple[TensorDataset, TensorDataset]:
        """(train, test) as TensorDatasets of (inputs, label index)."""
        x = self.inputs
        return (TensorDataset(x[self.train_indices], self.labels[self.train_indices]),
                TensorDataset(x[self.test_indices], self.labels[self.test_indices]))

    def check_labels(self, expected_sha256: str) -> None:
        """Refuse data whose label set is not the one the run agreed on (its digest)."""
        if expected_sha256 and expected_sha256 != self.labels_sha256:
            where = self.source or self.path
            raise SiteDataError(
                f"{where}: labels: this site's label set {list(self.label_names)} is not the run's "
                f"(labels_sha256 {expected_sha256[:16]}..., this site's {self.labels_sha256[:16]}...); "
                f"declare the federation's label set as `labels = [...]` in {where}")


def labels_sha256(names: Iterable[str]) -> str:
    """SHA-256 (hex) of the sorted, distinct label names joined by newlines: the same at every site
    holding the same set, whatever its order or counts."""
    names = sorted(set(names))
    check_label_names(names, "labels")
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def check_label_names(names: Iterable[str], where: str) -> None:
    names = list(names)
    if len(names) > MAX_LABELS:
        raise ValueError(f"{where}: {len(names)} labels (at most {MAX_LABELS})")
    for name in names:
        problem = label_problem(name)
        if problem:
            raise ValueError(f"{where}: label {name!r} {problem}")


def label_problem(name) -> str:
    """Why `name` cannot be a label name ("" when it can): names are joined by newlines for the
    digest, so a control character would make two different sets hash alike."""
    if not isinstance(name, str):
        return "is not a string"
    if not name.strip():
        return "is empty"
    if len(name) > MAX_LABEL_CHARS:
        return f"is longer than {MAX_LABEL_CHARS} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    return ""


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices, sorted: from each class, round(n_c * test_fraction) records drawn by
    `seed` go to the test set, but never a class's only record, so every class trains. A pure
    function of (labels, fraction, seed)."""
    rng = np.random.default_rng(seed)
    test = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n_test = min(int(round(len(idx) * test_fraction)), len(idx) - 1)
        test.append(rng.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train_mask = np.ones(len(labels), bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask).astype(np.int64), test_idx.astype(np.int64)


def read_config(toml_path: Path | str, task_name: str = "") -> SiteDataConfig:
    """The `[data]` table of a site's data file; ConfigError naming the file and the field."""
    table = load_table(toml_path, "site data file")
    try:
        check_known(table, ("data",), "", kind="section")
        if "data" not in table:
            raise ConfigError("data: missing (a site data file has one [data] table)")
        cfg = build(SiteDataConfig, table["data"], "data")
        if task_name and cfg.task and cfg.task != task_name:
            raise ConfigError(f"data.task: these data are for task {cfg.task!r}, the run's task is {task_name!r}")
    except ConfigError as err:
        raise ConfigError(f"{toml_path}: {err}") from None
    return cfg


def resolve_path(cfg: SiteDataConfig, toml_path: Path) -> Path:
    path = Path(cfg.path).expanduser()
    return path if path.is_absolute() else Path(toml_path).resolve().parent / path


def load_site_data(toml_path: Path | str, *, task_name: str = "") -> SiteDataset:
    """A site's data as its data file declares them, checked; ConfigError for the file itself,
    SiteDataError for data that do not match it."""
    from kt_core import site_readers

    toml_path = Path(toml_path)
    cfg = read_config(toml_path, task_name)
    path = resolve_path(cfg, toml_path)
    raw = site_readers.read(cfg, path)
    names, indices = _label_indices(raw.labels, cfg, path, raw.where)
    if len(indices) < 2:
        raise SiteDataError(f"{path}: fewer than 2 records: nothing to train and test on")
    train, test = stratified_split(indices, cfg.test_fraction, cfg.split_seed)
    return SiteDataset(format=cfg.format, path=path, labels=torch.from_numpy(indices), label_names=names,
                       train_indices=torch.from_numpy(train), test_indices=torch.from_numpy(test),
                       features=raw.features, feature_names=raw.feature_names, texts=raw.texts, images=raw.images,
                       source=toml_path, task=cfg.task or task_name)


def _label_indices(labels: list[str], cfg: SiteDataConfig, path: Path, where) -> tuple[tuple[str, ...], np.ndarray]:
    """The sorted label names (declared or found) and each record's index into them; a record's
    label outside the declared set is refused, naming its row."""
    column = cfg.label or "labels"
    if cfg.labels is not None:
        names = tuple(sorted(set(cfg.labels)))
        known = set(names)
        for i, name in enumerate(labels):
            if name not in known:
                raise SiteDataError(f"{path}: {column}: {where(i)}: label {name!r} is not one of the declared "
                                    f"labels {list(names)}")
    else:
        names = tuple(sorted(set(labels)))
        if len(names) > MAX_LABELS:
            raise SiteDataError(f"{path}: {column}: {len(names)} distinct labels (at most {MAX_LABELS})")
    index = {name: i for i, name in enumerate(names)}
    return names, np.fromiter((index[n] for n in labels), dtype=np.int64, count=len(labels))


@dataclass
class RawData:
    """What a reader returns: one label name per record and the records' inputs."""
    labels: list[str]
    where: object                       # record index -> "line 7" / "row 7" / "file cat/3.png"
    features: Tensor | None = None
    feature_names: tuple[str, ...] = ()
    texts: list[str] | None = None
    images: Tensor | None = None
