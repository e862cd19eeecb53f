"""A site's own data (kt_core.site_data): the four loaders, their schema checks on hostile files,
the stratified split and the label-set digest."""
from __future__ import annotations

import hashlib
import json
import os
import string

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kt_core.config_file import ConfigError
from kt_core.site_data import SiteDataError, labels_sha256, load_site_data, stratified_split

WINE_HEADER = "alcohol,ash,hue,class"


def site_file(folder, body: str, name: str = "site.toml"):
    path = folder / name
    path.write_text("[data]\n" + body)
    return path


def csv_site(tmp_path, rows: list[str], header: str = WINE_HEADER, extra: str = ""):
    (tmp_path / "t.csv").write_text("\n".join([header, *rows]) + "\n")
    return site_file(tmp_path, f'format = "csv"\npath = "t.csv"\nlabel = "class"\n'
                               f'features = ["alcohol", "ash", "hue"]\n{extra}')


GOOD_ROWS = [f"{13 + i / 10},{2 + i / 100},{1 - i / 50},{'abc'[i % 3]}" for i in range(30)]


def test_csv_loads_features_labels_and_a_stratified_split(tmp_path):
    ds = load_site_data(csv_site(tmp_path, GOOD_ROWS))
    assert ds.format == "csv" and ds.features.dtype == torch.float32 and ds.features.shape == (30, 3)
    assert ds.feature_names == ("alcohol", "ash", "hue") and ds.label_names == ("a", "b", "c")
    assert ds.features[1].tolist() == pytest.approx([13.1, 2.01, 0.98])
    assert ds.labels.dtype == torch.int64 and ds.labels[:3].tolist() == [0, 1, 2]
    assert len(ds.test_indices) == 6 and len(ds.train_indices) == 24        # 2 of each class's 10
    assert torch.bincount(ds.labels[ds.test_indices]).tolist() == [2, 2, 2]
    train, test = ds.tensor_datasets()
    assert len(train) == 24 and train[0][0].shape == (3,)
    shown = repr(ds).replace(str(tmp_path), "DIR")    # pytest's folder name has a run number in it
    assert "30" not in shown and "24" not in shown            # no counts in what may be logged


def test_csv_features_default_to_every_other_column_and_ignore_leaves_one_out(tmp_path):
    (tmp_path / "t.csv").write_text("id,x,y,label\n" + "".join(f"{i},{i},{-i},{i % 2}\n" for i in range(10)))
    ds = load_site_data(site_file(tmp_path, 'format = "csv"\npath = "t.csv"\nlabel = "label"\nignore = ["id"]'))
    assert ds.feature_names == ("x", "y") and ds.label_names == ("0", "1")


@pytest.mark.parametrize("rows, header, extra, expected", [
    (GOOD_ROWS, "alcohol,ash,class", "", "column 'hue' is missing"),
    (["1,2,3,a,9"] * 4, WINE_HEADER + ",patient_id", "", "column 'patient_id' is neither a feature"),
    (["1,2,x3,a"] * 4, WINE_HEADER, "", "hue: line 2: 'x3' is not a number"),
    (GOOD_ROWS[:3] + ["1,nan,3,a"], WINE_HEADER, "", "ash: line 5: 'nan' is not a finite number"),
    (GOOD_ROWS[:3] + ["1,2,1e39,a"], WINE_HEADER, "", "hue: line 5: '1e39' is not a finite number"),
    (GOOD_ROWS[:3] + ["1,2,3,  "], WINE_HEADER, "", "class: line 5: the label is empty"),
    (GOOD_ROWS[:3] + ["1,2,3,d"], WINE_HEADER, 'labels = ["a", "b", "c"]',
     "class: line 5: label 'd' is not one of the declared labels"),
    (GOOD_ROWS[:3] + ["1,2,3"], WINE_HEADER, "", "line 5: 3 fields, the header has 4"),
    (GOOD_ROWS, "alcohol,ash,ash,class", "", "column 'ash' appears twice"),
    (GOOD_ROWS, WINE_HEADER, "max_rows = 10", "more than max_rows = 10 rows"),
    (GOOD_ROWS, WINE_HEADER, "max_bytes = 100", "more than max_bytes = 100"),
    ([], WINE_HEADER, "", "no data rows"),
])
def test_csv_that_does_not_match_its_schema_is_refused_naming_file_field_and_line(tmp_path, rows, header,
                                                                                  extra, expected):
    with pytest.raises(SiteDataError) as err:
        load_site_data(csv_site(tmp_path, rows, header, extra))
    assert str(tmp_path / "t.csv") in str(err.value) and expected in str(err.value), str(err.value)


def test_a_csv_whose_decoded_values_outgrow_max_bytes_is_refused_while_it_is_read(tmp_path):
    # "1," is 2 bytes of file and 4 of tensor: a file within max_bytes can decode past it
    (tmp_path / "t.csv").write_text("a,b,c,d,y\n" + "1,1,1,1,x\n" * 50)
    size = (tmp_path / "t.csv").stat().st_size
    site = site_file(tmp_path, f'format = "csv"\npath = "t.csv"\nlabel = "y"\nmax_bytes = {size + 1}')
    with pytest.raises(SiteDataError, match=f"the decoded data take .* bytes, more than max_bytes = {size + 1}"):
        load_site_data(site)


def test_csv_that_is_not_utf8_or_not_a_regular_file_is_refused(tmp_path):
    site = csv_site(tmp_path, GOOD_ROWS)
    (tmp_path / "t.csv").write_bytes(WINE_HEADER.encode() + b"\n1,2,3,\xff\xfe\n")
    with pytest.raises(SiteDataError, match="not UTF-8"):
        load_site_data(site)
    (tmp_path / "t.csv").unlink()
    with pytest.raises(SiteDataError, match="file not found"):
        load_site_data(site)
    os.mkfifo(tmp_path / "t.csv")      # a FIFO would block the reader forever
    with pytest.raises(SiteDataError, match="not a regular file"):
        load_site_data(site)


@pytest.mark.parametrize("body, expected", [
    ('format = "csv"\npath = "t.csv"\nlabel = "y"\ncolour = 3', "data.colour: unknown field"),
    ('format = "xlsx"\npath = "t.csv"', "data.format: 'xlsx' is not one of"),
    ('format = "csv"\npath = "t.csv"', "data.label: required for format 'csv'"),
    ('format = "jsonl"\npath = "t.jsonl"\nlabel = "y"', "data.text_field: required"),
    ('format = "image_folder"\npath = "imgs"\nimage_size = [8]', "data.image_size: must be [height, width]"),
    ('format = "image_folder"\npath = "imgs"\nimage_size = [8, 8]\nchannels = 2', "data.channels"),
    ('format = "csv"\npath = "t.csv"\nlabel = "y"\ntest_fraction = 1.0', "data.test_fraction"),
    ('format = "csv"\npath = "t.csv"\nlabel = "y"\nlabels = ["a", "b\\nc"]', "control character"),
    ('format = "csv"\npath = "t.csv"\nlabel = "y"\nfeatures = ["y"]', "data.features"),
    ('format = "csv"\npath = "t.csv"\nlabel = "y"\ntask = "wine"', "data.task: these data are for task 'wine'"),
    ('format = "csv"\npath = "t.csv"\nlabel = "y"\nignore = ["y"]', "data.ignore: the label column 'y'"),
    ('format = "csv"\npath = "t.csv"\nlabel = "y"\nchannels = 1', "data.channels: only for format 'image_folder'"),
])
def test_a_site_data_file_that_is_wrong_is_a_config_error_naming_the_file_and_field(tmp_path, body, expected):
    path = site_file(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_site_data(path, task_name="digits")
    assert str(err.value).startswith(str(path)) and expected in str(err.value), str(err.value)


def test_a_site_data_file_without_a_data_table_or_with_another_section_is_refused(tmp_path):
    (tmp_path / "s.toml").write_text("[model]\nx = 1\n")
    with pytest.raises(ConfigError, match="model: unknown section"):
        load_site_data(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text("")
    with pytest.raises(ConfigError, match="data: missing"):
        load_site_data(tmp_path / "s.toml")


# --------------------------------------------------------------------------------------------- parquet

def parquet_site(tmp_path, columns: dict, extra: str = ""):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), tmp_path / "t.parquet")
    return site_file(tmp_path, f'format = "parquet"\npath = "t.parquet"\nlabel = "y"\nfeatures = ["a", "b"]\n{extra}')


def test_parquet_loads_numeric_columns_and_integer_or_text_labels(tmp_path):
    ds = load_site_data(parquet_site(tmp_path, {"a": [1.5, 2.5, 3.5, 4.5], "b": [1, 2, 3, 4], "y": [0, 1, 0, 1]}))
    assert ds.features.tolist() == [[1.5, 1], [2.5, 2], [3.5, 3], [4.5, 4]] and ds.label_names == ("0", "1")
    ds = load_site_data(parquet_site(tmp_path, {"a": [1.0] * 4, "b": [True, False] * 2, "y": ["n", "p"] * 2}))
    assert ds.label_names == ("n", "p") and ds.features[:, 1].tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("columns, extra, expected", [
    ({"a": [1.0, None, 3.0], "b": [1, 2, 3], "y": [0, 1, 0]}, "", "a: row 2: missing value"),
    ({"a": ["x", "y", "z"], "b": [1, 2, 3], "y": [0, 1, 0]}, "", "a: column of type string is not numeric"),
    ({"a": [1.0, float("inf"), 3.0], "b": [1, 2, 3], "y": [0, 1, 0]}, "", "a: row 2: inf is not a finite"),
    ({"a": [1.0, 2.0, 3.0], "b": [1, 2, 3], "y": ["p", None, "n"]}, "", "y: row 2: the label is empty"),
    ({"a": [1.0, 2.0, 3.0], "b": [1, 2, 3], "y": [0.5, 1.0, 0.0]}, "", "y: label column of type double"),
    ({"a": [1.0, 2.0, 3.0], "y": [0, 1, 0]}, "", "column 'b' is missing"),
    ({"a": [1.0] * 20, "b": [1] * 20, "y": [0, 1] * 10}, "max_rows = 5", "20 rows, more than max_rows = 5"),
])
def test_parquet_that_does_not_match_its_schema_is_refused(tmp_path, columns, extra, expected):
    with pytest.raises(SiteDataError) as err:
        load_site_data(parquet_site(tmp_path, columns, extra))
    assert str(tmp_path / "t.parquet") in str(err.value) and expected in str(err.value), str(err.value)


def test_a_file_that_is_not_parquet_is_refused(tmp_path):
    site = parquet_site(tmp_path, {"a": [1.0], "b": [1], "y": [0]})
    (tmp_path / "t.parquet").write_bytes(b"PAR1" + os.urandom(200))
    with pytest.raises(SiteDataError, match="not a readable Parquet file"):
        load_site_data(site)


# --------------------------------------------------------------------------------------------- images

def image_site(tmp_path, classes=("cat", "dog"), per_class=3, size=(8, 6), mode="L", extra=""):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (tmp_path / "imgs" / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[0], size[1]) + (() if mode == "L" else (len(mode),))
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(tmp_path / "imgs" / name / f"{i}.png")
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    return site_file(tmp_path, f'format = "image_folder"\npath = "imgs"\nimage_size = [8, 6]\n'
                               f'channels = {channels}\n{extra}')


def test_an_image_folder_loads_one_class_per_folder_as_floats_in_0_1(tmp_path):
    from PIL import Image

    site = image_site(tmp_path, mode="RGB")
    (tmp_path / "imgs" / ".DS_Store").write_bytes(b"litter")     # hidden entries are skipped
    ds = load_site_data(site)
    assert ds.images.shape == (6, 3, 8, 6) and ds.images.dtype == torch.float32
    assert 0 <= ds.images.min() and ds.images.max() <= 1 and ds.label_names == ("cat", "dog")
    first = np.asarray(Image.open(tmp_path / "imgs" / "cat" / "0.png"), dtype=np.float32) / 255
    assert np.allclose(ds.images[0].permute(1, 2, 0).numpy(), first)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.inputs is ds.images


def test_images_of_the_wrong_size_or_mode_or_that_do_not_decode_are_refused_by_file(tmp_path):
    from PIL import Image

    site = image_site(tmp_path)
    Image.new("L", (7, 8)).save(tmp_path / "imgs" / "dog" / "9.png")
    with pytest.raises(SiteDataError, match=r"dog/9.png: 8x7 pixels, image_size is 8x6"):
        load_site_data(site)
    Image.new("RGB", (6, 8)).save(tmp_path / "imgs" / "dog" / "9.png")
    with pytest.raises(SiteDataError, match=r"dog/9.png: mode RGB, channels = 1 needs mode L"):
        load_site_data(site)
    (tmp_path / "imgs" / "dog" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(SiteDataError, match=r"dog/9.png: not a decodable image"):
        load_site_data(site)


def test_an_image_folder_refuses_links_out_of_it_stray_files_and_nested_folders(tmp_path):
    site = image_site(tmp_path)
    outside = tmp_path / "secret.png"
    (tmp_path / "imgs" / "cat" / "0.png").rename(outside)
    (tmp_path / "imgs" / "cat" / "0.png").symlink_to(outside)
    with pytest.raises(SiteDataError, match="cat/0.png: a link that leads outside the data folder"):
        load_site_data(site)
    (tmp_path / "imgs" / "cat" / "0.png").unlink()
    (tmp_path / "imgs" / "cat" / "deeper").mkdir()
    with pytest.raises(SiteDataError, match="cat/deeper: not an image file"):
        load_site_data(site)
    (tmp_path / "imgs" / "cat" / "deeper").rmdir()
    (tmp_path / "imgs" / "README.txt").write_text("hi")
    with pytest.raises(SiteDataError, match="README.txt: not a class folder"):
        load_site_data(site)
    (tmp_path / "imgs" / "README.txt").unlink()
    with pytest.raises(SiteDataError, match="more than max_rows = 3 images"):
        load_site_data(site_file(tmp_path, site.read_text().removeprefix("[data]\n") + "max_rows = 3\n"))


# --------------------------------------------------------------------------------------------- jsonl

def jsonl_site(tmp_path, lines: list, extra: str = ""):
    (tmp_path / "t.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return site_file(tmp_path, f'format = "jsonl"\npath = "t.jsonl"\ntext_field = "text"\nlabel = "y"\n{extra}')


def test_jsonl_loads_texts_and_labels(tmp_path):
    rows = [{"text": f"tweet {i}", "y": ["neg", "pos"][i % 2], "extra": [1, 2]} for i in range(10)]
    ds = load_site_data(jsonl_site(tmp_path, rows[:5] + [""] + rows[5:]))
    assert ds.texts == [r["text"] for r in rows] and ds.label_names == ("neg", "pos") and ds.features is None
    with pytest.raises(SiteDataError, match="hold texts, not tensors"):
        ds.inputs


@pytest.mark.parametrize("bad, expected", [
    ('{"text": "a", "y": ', "line 3: not valid JSON"),
    ('["text", "y"]', "line 3: expected a JSON object, got list"),
    ('{"y": "neg"}', "text: line 3: the field is missing"),
    ('{"text": "a"}', "y: line 3: the field is missing"),
    ('{"text": 5, "y": "neg"}', "text: line 3: expected a string, got int"),
    ('{"text": "a", "y": true}', "y: line 3: label True is neither text nor an integer"),
    ('{"text": "a", "y": NaN}', "NaN is not a JSON number"),
    ('{"text": "a", "y": "neg", "z": ' + "[" * 100 + "]" * 100 + "}", "nested 101 levels deep"),
    ('{"text": "' + "a" * (1 << 20) + '", "y": "neg"}', "line 3: longer than 1048576 bytes"),
])
def test_json_lines_that_do_not_parse_or_lack_a_field_are_refused_by_line(tmp_path, bad, expected):
    good = {"text": "ok", "y": "neg"}
    with pytest.raises(SiteDataError) as err:
        load_site_data(jsonl_site(tmp_path, [good, good, bad]))
    assert str(tmp_path / "t.jsonl") in str(err.value) and expected in str(err.value), str(err.value)


# --------------------------------------------------------------------------------------------- labels

def test_labels_sha256_is_sha256_of_the_sorted_distinct_names_and_the_site_checks_it(tmp_path):
    assert labels_sha256(["b", "a", "b"]) == hashlib.sha256(b"a\nb").hexdigest()
    ds = load_site_data(csv_site(tmp_path, GOOD_ROWS))
    ds.check_labels(labels_sha256(["c", "b", "a"]))
    ds.check_labels("")                                   # a run that carries no digest
    with pytest.raises(SiteDataError, match=r"labels: this site's label set \['a', 'b', 'c'\] is not the run's"):
        ds.check_labels(labels_sha256(["a", "b", "c", "d"]))
    # a site holding only some classes declares the federation's set: same indices, same digest
    skewed = load_site_data(csv_site(tmp_path, [r for r in GOOD_ROWS if r.endswith("c")] + GOOD_ROWS[:2],
                                     extra='labels = ["c", "b", "a", "d"]'))
    assert skewed.label_names == ("a", "b", "c", "d") and skewed.labels[-2:].tolist() == [0, 1]
    with pytest.raises(ValueError, match="control character"):
        labels_sha256(["a\nb"])


names = st.text(alphabet=string.ascii_letters + string.digits + " -_é", min_size=1, max_size=12).filter(str.strip)


@given(st.lists(names, min_size=1, max_size=8), st.randoms())
def test_labels_sha256_ignores_order_and_repeats(labels, rnd):
    shuffled = labels + labels[: len(labels) // 2]
    rnd.shuffle(shuffled)
    assert labels_sha256(shuffled) == labels_sha256(labels)


@given(st.sets(names, min_size=1, max_size=6), st.sets(names, min_size=1, max_size=6))
def test_labels_sha256_tells_different_sets_apart(a, b):
    assert (labels_sha256(a) == labels_sha256(b)) == (a == b)


@given(st.lists(st.integers(0, 4), min_size=2, max_size=200), st.floats(0.05, 0.95), st.integers(0, 2**32))
def test_the_split_is_a_deterministic_stratified_partition(labels, fraction, seed):
    y = np.asarray(labels)
    train, test = stratified_split(y, fraction, seed)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(y)))
    assert np.array_equal(train, np.sort(train)) and np.array_equal(test, np.sort(test))
    for cls in np.unique(y):
        n = int((y == cls).sum())
        assert int((y[test] == cls).sum()) == min(round(n * fraction), n - 1)   # every class also trains
    again = stratified_split(y, fraction, seed)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(-1e6, 1e6, allow_nan=False), st.integers(-1000, 1000),
                          st.sampled_from(["x", "y", "z"])), min_size=2, max_size=30))
def test_a_csv_reads_back_what_was_written(tmp_path, rows):
    (tmp_path / "t.csv").write_text("f,g,label\n" + "".join(f"{a!r},{b},{c}\n" for a, b, c in rows))
    ds = load_site_data(site_file(tmp_path, 'format = "csv"\npath = "t.csv"\nlabel = "label"'))
    assert np.allclose(ds.features.numpy(), np.asarray([[a, b] for a, b, _ in rows], dtype=np.float32))
    assert [ds.label_names[i] for i in ds.labels] == [c for _, _, c in rows]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_data_or_a_site_data_error_never_a_crash(tmp_path, data):
    (tmp_path / "imgs" / "a").mkdir(parents=True, exist_ok=True)
    for fmt, name, body in (("csv", "t.csv", 'label = "y"'), ("jsonl", "t.jsonl", 'label = "y"\ntext_field = "t"'),
                            ("parquet", "t.parquet", 'label = "y"'),
                            ("image_folder", "imgs/a/x.png", 'image_size = [8, 8]')):
        (tmp_path / name).write_bytes(data)
        name = "imgs" if fmt == "image_folder" else name
        try:
            load_site_data(site_file(tmp_path, f'format = "{fmt}"\npath = "{name}"\n{body}'))
        except SiteDataError:
            pass
