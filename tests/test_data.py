"""Datasets, the idx parser, and non-IID partitions."""
import gzip
import shutil
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kt_core.config import ConfigError, load_toml
from kt_core.data import (FASHION_MNIST_DIR, FASHION_MNIST_FILES, DatasetError, PartitionSpec,
                          fashion_mnist_available, load_dataset, proportion_matrix, read_idx,
                          read_idx_pair, site_indices, site_split, subsample_indices)

FAST = settings(max_examples=40, deadline=None)


def names(n):
    return [f"site-{i}" for i in range(n)]


def all_shards(labels, num_classes, sites, spec):
    return {s: site_indices(labels, num_classes, sites, s, spec) for s in sites}


# ---------------------------------------------------------------------------------------------
# partitions
# ---------------------------------------------------------------------------------------------

spec_st = st.builds(
    PartitionSpec,
    scheme=st.sampled_from(["dirichlet", "shards", "iid", "quantity"]),
    alpha=st.floats(0.01, 100.0),
    classes_per_site=st.integers(1, 10),
    seed=st.integers(0, 2**31),
)


@FAST
@given(n_sites=st.integers(1, 12), spec=spec_st, data_seed=st.integers(0, 2**16),
       n=st.integers(0, 600))
def test_shards_are_disjoint_and_cover_what_the_scheme_assigns(n_sites, spec, data_seed, n):
    labels = np.random.default_rng(data_seed).integers(0, 10, size=n)
    shards = all_shards(labels, 10, names(n_sites), spec)
    joined = np.concatenate(list(shards.values()))
    assert len(joined) == len(np.unique(joined))                      # disjoint
    for idx in shards.values():
        assert np.all(np.diff(idx) > 0)                              # sorted
    P = proportion_matrix(10, names(n_sites), spec)
    assigned = np.flatnonzero(P.sum(axis=0) > 0)                     # classes some site holds
    expected = np.flatnonzero(np.isin(labels, assigned))
    assert np.array_equal(np.sort(joined), expected)                  # covering
    if spec.scheme != "shards" or n_sites * spec.classes_per_site >= 10:
        assert len(assigned) == 10                                    # every class is used


@FAST
@given(n_sites=st.integers(1, 12), k=st.integers(1, 10), seed=st.integers(0, 2**31))
def test_shards_give_each_site_exactly_k_classes(n_sites, k, seed):
    labels = np.repeat(np.arange(10), 30)      # enough samples that every share is non-empty
    spec = PartitionSpec("shards", classes_per_site=k, seed=seed)
    for site, idx in all_shards(labels, 10, names(n_sites), spec).items():
        assert len(np.unique(labels[idx])) == k, site


def test_shared_classes_are_split_evenly():
    labels = np.repeat(np.arange(4), 100)
    spec = PartitionSpec("shards", classes_per_site=2, seed=0)
    shards = all_shards(labels, 4, names(4), spec)          # 8 slots over 4 classes: each class twice
    for idx in shards.values():
        assert np.array_equal(np.bincount(labels[idx], minlength=4)[np.unique(labels[idx])], [50, 50])


def test_iid_sites_get_equal_shares_of_every_class():
    labels = np.repeat(np.arange(10), 90)
    for idx in all_shards(labels, 10, names(3), PartitionSpec("iid")).values():
        assert np.array_equal(np.bincount(labels[idx], minlength=10), np.full(10, 30))


def test_small_dirichlet_alpha_is_more_skewed_than_a_large_one():
    labels = np.repeat(np.arange(10), 200)

    def skew(alpha):
        shards = all_shards(labels, 10, names(5), PartitionSpec("dirichlet", alpha=alpha, seed=1))
        return np.mean([np.bincount(labels[i], minlength=10).max() / max(len(i), 1)
                        for i in shards.values()])

    assert skew(0.1) > skew(100.0) + 0.2


def test_quantity_skew_keeps_the_label_mix_and_skews_the_sizes():
    labels = np.repeat(np.arange(10), 200)
    shards = all_shards(labels, 10, names(8), PartitionSpec("quantity", alpha=0.3, seed=3))
    sizes = np.array([len(i) for i in shards.values()])
    assert sizes.sum() == len(labels) and sizes.max() > 3 * np.median(sizes)
    for idx in shards.values():
        if len(idx) >= 100:                   # every site holds each class in the global share
            share = np.bincount(labels[idx], minlength=10) / len(idx)
            assert np.all(np.abs(share - 0.1) < 0.02)
    even = all_shards(labels, 10, names(8), PartitionSpec("quantity", alpha=1000.0, seed=3))
    assert max(len(i) for i in even.values()) < 1.2 * min(len(i) for i in even.values())


@FAST
@given(spec=spec_st, n_sites=st.integers(2, 8), perm_seed=st.integers(0, 1000))
def test_partition_is_deterministic_and_ignores_the_order_sites_are_listed_in(spec, n_sites, perm_seed):
    labels = np.random.default_rng(0).integers(0, 10, size=300)
    sites = names(n_sites)
    shuffled = list(np.random.default_rng(perm_seed).permutation(sites))
    for s in sites:
        a = site_indices(labels, 10, sites, s, spec)
        assert np.array_equal(a, site_indices(labels, 10, sites, s, spec))
        assert np.array_equal(a, site_indices(labels, 10, shuffled, s, spec))


def test_different_seeds_give_different_partitions():
    labels = np.random.default_rng(0).integers(0, 10, size=500)
    a = site_indices(labels, 10, names(4), "site-0", PartitionSpec(seed=1))
    b = site_indices(labels, 10, names(4), "site-0", PartitionSpec(seed=2))
    assert not np.array_equal(a, b)


def test_partition_errors_name_what_is_wrong():
    labels = np.zeros(10, dtype=np.int64)
    with pytest.raises(ValueError, match="'mallory'"):
        site_indices(labels, 10, names(3), "mallory", PartitionSpec())
    with pytest.raises(ValueError, match="duplicate"):
        site_indices(labels, 10, ["a", "a"], "a", PartitionSpec())
    with pytest.raises(ValueError, match="sites: empty"):
        site_indices(labels, 10, [], "a", PartitionSpec())
    with pytest.raises(ValueError, match="classes_per_site"):
        site_indices(labels, 10, ["a"], "a", PartitionSpec("shards", classes_per_site=11))
    with pytest.raises(ValueError, match="labels"):
        site_indices(np.array([0, 10]), 10, ["a"], "a", PartitionSpec())
    with pytest.raises(ValueError, match="labels"):
        site_indices(np.array([0.5]), 10, ["a"], "a", PartitionSpec())


@pytest.mark.parametrize("field,value", [
    ("scheme", "random"), ("alpha", 0.0), ("alpha", float("nan")), ("classes_per_site", 0),
    ("seed", -1), ("seed", 1.5),
])
def test_partition_spec_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PartitionSpec(**{field: value}).validate()


@pytest.mark.parametrize("dataset", ["digits", "auto"])
def test_a_run_whose_shards_hold_more_classes_than_the_data_is_refused_before_any_site_builds(dataset):
    text = f'[data]\ndataset = "{dataset}"\n[data.partition]\nscheme = "shards"\nclasses_per_site = 11\n'
    with pytest.raises(ConfigError, match=r"data\.partition\.classes_per_site: 11 exceeds the 10 classes"):
        load_toml(text)
    assert load_toml(text.replace("11", "10")).data.partition.classes_per_site == 10


def test_site_split_applies_the_same_proportions_to_train_and_test():
    ds = load_dataset("digits")
    spec = PartitionSpec("shards", classes_per_site=2, seed=3)
    seen = 0
    for site in names(5):
        tx, ty, vx, vy = site_split(ds, names(5), site, spec)
        assert set(np.unique(vy)) == set(np.unique(ty)) and len(np.unique(ty)) == 2
        assert tx.shape == (len(ty), 64) and vx.shape == (len(vy), 64)
        seen += len(vy)
    assert seen == len(ds.test_y)


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------

def test_digits():
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10 and ds.input_dim == 64
    assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int64
    assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
    assert len(ds.test_y) == 1797 // 5 and len(ds.train_y) + len(ds.test_y) == 1797
    again = load_dataset("digits")
    assert np.array_equal(ds.test_x, again.test_x) and np.array_equal(ds.train_y, again.train_y)


def test_subsample_is_deterministic_and_class_proportional():
    labels = np.concatenate([np.zeros(600), np.ones(300), np.full(100, 2)]).astype(np.int64)
    idx = subsample_indices(labels, 100, seed=0)
    assert np.array_equal(idx, subsample_indices(labels, 100, seed=0))
    assert np.all(np.diff(idx) > 0)
    assert np.array_equal(np.bincount(labels[idx]), [60, 30, 10])
    assert not np.array_equal(idx, subsample_indices(labels, 100, seed=1))
    assert len(subsample_indices(labels, 5000)) == 1000


def test_max_train_and_max_test():
    ds = load_dataset("digits", max_train=200, max_test=50)
    assert len(ds.train_y) == 200 and len(ds.test_y) == 50
    assert np.bincount(ds.train_y).min() >= 15
    with pytest.raises(ValueError, match="max_train"):
        load_dataset("digits", max_train=0)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="'cifar'"):
        load_dataset("cifar")


def _idx_bytes(array: np.ndarray, dtype_code=0x08) -> bytes:
    header = bytes([0, 0, dtype_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(">u1").tobytes()


def _write(path, payload: bytes):
    path.write_bytes(gzip.compress(payload))
    return path


@pytest.fixture
def idx_pair(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 4, 3), dtype=np.uint8)
    labels = np.arange(12, dtype=np.uint8) % 10
    img = _write(tmp_path / "imgs-idx3-ubyte.gz", _idx_bytes(images))
    lab = _write(tmp_path / "labels-idx1-ubyte.gz", _idx_bytes(labels))
    return img, lab, images, labels


def test_idx_parser_reads_a_valid_file(idx_pair):
    img, lab, images, labels = idx_pair
    x, y = read_idx_pair(img, lab)
    assert x.shape == (12, 12) and x.dtype == np.float32
    assert np.allclose(x, images.reshape(12, -1) / 255.0)
    assert np.array_equal(y, labels) and y.dtype == np.int64
    # an uncompressed file is read too
    raw = img.with_suffix("")
    raw.write_bytes(gzip.decompress(img.read_bytes()))
    assert np.array_equal(read_idx(raw, ndim=3), images)


@pytest.mark.parametrize("corruption,message", [
    ("bad_magic", "bad magic number"),
    ("dtype_code", "dtype code 0x0c"),
    ("ndim", "2 dimensions"),
    ("truncated_payload", "payload is"),
    ("extra_payload", "payload is"),
    ("truncated_header", "truncated header"),
    ("not_gzip", "cannot decompress"),
    ("empty", "truncated header"),
])
def test_idx_parser_rejects_a_corrupt_images_file_naming_it(idx_pair, corruption, message):
    img, lab, images, _ = idx_pair
    good = _idx_bytes(images)
    payload = {
        "bad_magic": b"\x01\x02" + good[2:],
        "dtype_code": good[:2] + b"\x0c" + good[3:],
        "ndim": good[:3] + b"\x02" + good[4:],
        "truncated_payload": good[:-1],
        "extra_payload": good + b"\x00",
        "truncated_header": good[:9],
        "empty": b"",
    }
    if corruption == "not_gzip":
        img.write_bytes(b"this is not gzip data")
    else:
        _write(img, payload[corruption])
    with pytest.raises(DatasetError, match=message) as err:
        read_idx_pair(img, lab)
    assert str(img) in str(err.value)


def test_idx_parser_rejects_a_count_mismatch_naming_both_files(idx_pair, tmp_path):
    img, _, _, _ = idx_pair
    lab = _write(tmp_path / "short-labels.gz", _idx_bytes(np.zeros(11, dtype=np.uint8)))
    with pytest.raises(DatasetError, match="12 images") as err:
        read_idx_pair(img, lab)
    assert str(img) in str(err.value) and str(lab) in str(err.value)


def test_idx_parser_rejects_labels_out_of_range_naming_the_file(idx_pair):
    img, lab, _, labels = idx_pair
    bad = labels.copy()
    bad[5] = 10
    _write(lab, _idx_bytes(bad))
    with pytest.raises(DatasetError, match="label 10 at index 5") as err:
        read_idx_pair(img, lab)
    assert str(lab) in str(err.value)


def test_missing_idx_file_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_idx(tmp_path / "nope.gz", ndim=1)


def _fake_fashion(folder, n_train=30, n_test=10):
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("test", n_test)):
        img_name, lab_name = FASHION_MNIST_FILES[split]
        _write(folder / img_name, _idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        _write(folder / lab_name, _idx_bytes((np.arange(n) % 10).astype(np.uint8)))


def test_auto_prefers_fashion_mnist_under_root_and_falls_back_to_digits(tmp_path):
    _fake_fashion(tmp_path)
    ds = load_dataset("auto", root=tmp_path)
    assert ds.name == "fashion-mnist" and ds.train_x.shape == (30, 784) and ds.test_x.shape == (10, 784)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not fashion_mnist_available(empty)
    assert load_dataset("auto", root=empty).name == "digits"


def test_a_corrupt_fashion_mnist_under_root_is_reported_not_skipped(tmp_path):
    _fake_fashion(tmp_path)
    shutil.copy(tmp_path / FASHION_MNIST_FILES["test"][1], tmp_path / FASHION_MNIST_FILES["train"][1])
    with pytest.raises(DatasetError, match="30 images"):
        load_dataset("fashion-mnist", root=tmp_path)


@pytest.mark.skipif(not fashion_mnist_available(), reason=f"no Fashion-MNIST in {FASHION_MNIST_DIR}")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist", max_test=1000)
    assert ds.train_x.shape == (60000, 784) and ds.test_x.shape == (1000, 784)
    assert np.array_equal(np.bincount(ds.train_y), np.full(10, 6000))
    assert np.array_equal(np.bincount(ds.test_y), np.full(10, 100))
    assert ds.train_x.dtype == np.float32 and 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
    assert load_dataset("auto", max_train=10, max_test=10).name == "fashion-mnist"
