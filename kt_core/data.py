"""Image datasets and non-IID partitions.

Partitions are a pure function of (labels, site names, spec): each participant computes only its own
shard, yet the shards of all sites are disjoint and cover the data as the scheme says, with no
coordinator ever seeing an index. All sites must run the same numpy major version (pinned), since
the partition is drawn from numpy's seeded generators.
"""
from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SCHEMES = ("dirichlet", "shards", "iid", "quantity")


class DatasetError(ValueError):
    pass


@dataclass
class Dataset:
    name: str
    train_x: np.ndarray     # float32, N x D, in [0, 1]
    train_y: np.ndarray     # int64
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int

    @property
    def input_dim(self) -> int:
        return int(self.train_x.shape[1])


# ---------------------------------------------------------------------------------------------
# idx files (LeCun's MNIST format): magic 0x0000 <dtype code> <ndim>, ndim big-endian uint32 dims,
# then the payload, big-endian
# ---------------------------------------------------------------------------------------------

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike, ndim: int, dtype_code: int = 0x08) -> np.ndarray:
    """Read and validate one idx file (gzip if it ends in .gz) with the expected ndim and dtype."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"{path}: cannot decompress ({err})") from None
    if len(raw) < 4:
        raise DatasetError(f"{path}: truncated header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path}: bad magic number 0x{raw[:4].hex()} "
                           f"(an idx file starts with two zero bytes)")
    if raw[2] != dtype_code:
        raise DatasetError(f"{path}: dtype code 0x{raw[2]:02x} in the magic number, "
                           f"expected 0x{dtype_code:02x}")
    if raw[3] != ndim:
        raise DatasetError(f"{path}: {raw[3]} dimensions in the magic number, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated header ({len(raw)} bytes, need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[dtype_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: payload is {len(raw) - header} bytes but the header dims {dims} "
                           f"need {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def read_idx_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike,
                  num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, N x H x W) and labels (uint8, N) as float32 N x HW in [0, 1] and int64."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{images_path} has {images.shape[0]} images but {labels_path} has "
                           f"{labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise DatasetError(f"{labels_path}: label {int(labels[bad])} at index {bad} is out of range "
                           f"[0, {num_classes})")
    x = images.reshape(images.shape[0], -1).astype(np.float32) / 255.0
    return x, labels.astype(np.int64)


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    return all((folder / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair)


def _load_fashion_mnist(root) -> Dataset:
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    train_x, train_y = read_idx_pair(*(folder / f for f in FASHION_MNIST_FILES["train"]))
    test_x, test_y = read_idx_pair(*(folder / f for f in FASHION_MNIST_FILES["test"]))
    return Dataset("fashion-mnist", train_x, train_y, test_x, test_y, num_classes=10)


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)       # pixel values are 0..16
    y = digits.target.astype(np.int64)
    # a fixed held-out 20%, the same on every machine
    order = np.random.default_rng(0).permutation(len(y))
    n_test = len(y) // 5
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return Dataset("digits", x[train], y[train], x[test], y[test], num_classes=10)


def subsample_indices(labels: np.ndarray, n: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a deterministic, class-proportional subsample of size n."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    # each sample's position within its class (in shuffled order) as a fraction of the class size:
    # sorting by it interleaves the classes, so any prefix holds them in proportion
    frac = np.empty(len(labels))
    for c in np.unique(labels):
        members = perm[labels[perm] == c]
        frac[members] = (np.arange(len(members)) + 0.5) / len(members)
    order = perm[np.argsort(frac[perm], kind="stable")]
    return np.sort(order[:n])


def load_dataset(name: str = "auto", root: str | os.PathLike | None = None,
                 max_train: int | None = None, max_test: int | None = None,
                 seed: int = 0) -> Dataset:
    """'fashion-mnist' (the Debian package's idx files, or `root`), 'digits' (scikit-learn), or
    'auto': fashion-mnist when its files exist, else digits."""
    for field, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{field}: must be a positive integer or None, got {value!r}")
    if name == "auto":
        name = "fashion-mnist" if fashion_mnist_available(root) else "digits"
    if name == "fashion-mnist":
        ds = _load_fashion_mnist(root)
    elif name == "digits":
        ds = _load_digits()
    else:
        raise ValueError(f"name: unknown dataset {name!r} "
                         f"(expected 'auto', 'fashion-mnist' or 'digits')")
    train = subsample_indices(ds.train_y, max_train, seed)
    test = subsample_indices(ds.test_y, max_test, seed + 1)
    return Dataset(ds.name, ds.train_x[train], ds.train_y[train], ds.test_x[test], ds.test_y[test],
                   ds.num_classes)


# ---------------------------------------------------------------------------------------------
# non-IID partitions
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PartitionSpec:
    scheme: str = "dirichlet"       # dirichlet | shards | iid | quantity
    # Dirichlet concentration, small = more skewed: of each class over the sites (dirichlet), or of
    # the sites' sizes (quantity: every site has the global label mix, in very unequal amounts)
    alpha: float = 0.5
    classes_per_site: int = 2       # shards: how many classes each site holds
    seed: int = 0

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme: {self.scheme!r} is not one of {list(SCHEMES)}")
        if (not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool)
                or not np.isfinite(self.alpha) or self.alpha <= 0):
            raise ValueError(f"alpha: must be a finite number > 0, got {self.alpha!r}")
        if not isinstance(self.classes_per_site, int) or isinstance(self.classes_per_site, bool) \
                or self.classes_per_site < 1:
            raise ValueError(f"classes_per_site: must be a positive integer, "
                             f"got {self.classes_per_site!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed: must be a non-negative integer, got {self.seed!r}")


def _canonical_sites(sites: Sequence[str]) -> list[str]:
    # sorted, so every participant gets the same matrix whatever order it was told the sites in
    names = list(sites)
    if not names:
        raise ValueError("sites: empty")
    for s in names:
        if not isinstance(s, str) or not s:
            raise ValueError(f"sites: site names must be non-empty strings, got {s!r}")
    if len(set(names)) != len(names):
        dup = sorted({s for s in names if names.count(s) > 1})
        raise ValueError(f"sites: duplicate site name(s) {dup}")
    return sorted(names)


def proportion_matrix(num_classes: int, sites: Sequence[str], spec: PartitionSpec) -> np.ndarray:
    """P[site, class]: the fraction of each class that each site (in sorted name order) holds.

    Each column sums to 1, except, under 'shards' with fewer site slots than classes, the columns
    of classes no site was dealt: those samples belong to no site.
    """
    spec.validate()
    n_sites = len(_canonical_sites(sites))
    if spec.scheme == "iid":
        return np.full((n_sites, num_classes), 1.0 / n_sites)
    rng = np.random.default_rng([spec.seed, 0])
    if spec.scheme == "dirichlet":
        return rng.dirichlet(np.full(n_sites, float(spec.alpha)), size=num_classes).T
    if spec.scheme == "quantity":
        sizes = rng.dirichlet(np.full(n_sites, float(spec.alpha)))
        return np.repeat(sizes[:, None], num_classes, axis=1)
    k = spec.classes_per_site
    if k > num_classes:
        raise ValueError(f"classes_per_site: {k} exceeds the {num_classes} classes")
    # deal k consecutive classes of a seeded class order to each site in turn, wrapping around, so
    # every class is used once there are enough slots; a class dealt to m sites is split evenly
    order = rng.permutation(num_classes)
    held = np.zeros((n_sites, num_classes))
    for s in range(n_sites):
        held[s, order[(s * k + np.arange(k)) % num_classes]] = 1.0
    counts = held.sum(axis=0)
    return np.divide(held, counts, out=np.zeros_like(held), where=counts > 0)


def _apply_proportions(labels: np.ndarray, P: np.ndarray, row: int, seed: int) -> np.ndarray:
    idx = []
    for c in range(P.shape[1]):
        members = np.flatnonzero(labels == c)
        col = P[:, c]
        if members.size == 0 or col.sum() <= 0:
            continue
        # the same seeded shuffle of this class at every site; contiguous cuts at the cumulative
        # proportions make the pieces disjoint and covering by construction
        members = np.random.default_rng([seed, 1, c]).permutation(members)
        cuts = np.floor(np.cumsum(col) / col.sum() * members.size + 0.5).astype(np.int64)
        cuts[-1] = members.size
        start = 0 if row == 0 else cuts[row - 1]
        idx.append(members[start:cuts[row]])
    return np.sort(np.concatenate(idx)) if idx else np.zeros(0, dtype=np.int64)


def site_indices(labels: np.ndarray, num_classes: int, sites: Sequence[str], site: str,
                 spec: PartitionSpec) -> np.ndarray:
    """Sorted indices of `site`'s samples among `labels`."""
    names = _canonical_sites(sites)
    if site not in names:
        raise ValueError(f"site {site!r} is not one of the sites {names}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: must be a 1-d integer array, "
                         f"got {labels.dtype} with shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels: values must lie in [0, {num_classes})")
    P = proportion_matrix(num_classes, names, spec)
    return _apply_proportions(labels, P, names.index(site), spec.seed)


def site_split(dataset: Dataset, sites: Sequence[str], site: str, spec: PartitionSpec
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y) of one site. The same proportions cut the test set, so a
    site's local test data follows its own label distribution (personalized-FL accuracy)."""
    tr = site_indices(dataset.train_y, dataset.num_classes, sites, site, spec)
    te = site_indices(dataset.test_y, dataset.num_classes, sites, site, spec)
    return dataset.train_x[tr], dataset.train_y[tr], dataset.test_x[te], dataset.test_y[te]
