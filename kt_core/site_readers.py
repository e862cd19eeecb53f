"""The readers behind kt_core.site_data: CSV, Parquet, image folders and JSON Lines.

Each takes the site's `[data]` settings and the resolved path, bounds what it reads before it
reads it (the file's bytes, rows, columns, line and text lengths, the image sizes in their
headers), checks every value, and returns a `RawData`: the label name of each record and its
inputs. Every refusal is a SiteDataError naming the file, the column or field, and the row, line
or image file, so that an operator can fix the export rather than guess.
"""
from __future__ import annotations

import csv
import io
from array import array
import math
import os
import stat
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from kt_core.bounded import BoundedInputError, loads_json
from kt_core.site_data import MAX_COLUMNS, MAX_LABELS, RawData, SiteDataConfig, SiteDataError, label_problem

MAX_LINE_BYTES = 1 << 20          # a JSON line or a CSV field
MAX_TEXT_CHARS = 100_000
MAX_IMAGE_FILE_BYTES = 64 << 20
# decoders for formats that hold a plain raster; others (EPS runs Ghostscript) are never tried
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def read(cfg: SiteDataConfig, path: Path) -> RawData:
    readers = {"csv": read_csv, "parquet": read_parquet, "image_folder": read_image_folder, "jsonl": read_jsonl}
    return readers[cfg.format](cfg, path)


@contextmanager
def open_bounded(path: Path, max_bytes: int):
    """The file opened for reading, refused unless it is a regular file of at most `max_bytes`
    (a FIFO or /dev/zero would never end); fstat on the open handle, so nothing swaps it between."""
    try:
        # non-blocking: opening a FIFO for reading would otherwise wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise SiteDataError(f"{path}: path: file not found") from None
    except OSError as err:
        raise SiteDataError(f"{path}: path: cannot open: {err.strerror or err}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise SiteDataError(f"{path}: path: not a regular file")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as fh:
        if info.st_size > max_bytes:
            raise SiteDataError(f"{path}: path: {info.st_size} bytes, more than max_bytes = {max_bytes}")
        yield fh


def _label(value, path: Path, field: str, where: str) -> str:
    """A label read from the data, as its name: strings (stripped) and integers."""
    if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
        raise SiteDataError(f"{path}: {field}: {where}: label {value!r} is neither text nor an integer")
    name = value.strip() if isinstance(value, str) else str(int(value))
    problem = label_problem(name)
    if problem:
        raise SiteDataError(f"{path}: {field}: {where}: the label {problem}")
    return name


def _columns(header: list[str], cfg: SiteDataConfig, path: Path) -> list[str]:
    """The feature columns, in order, after checking the header against what the file declares:
    no duplicate, nothing missing, nothing extra that is not ignored."""
    if len(header) > MAX_COLUMNS + len(cfg.ignore) + 1:
        raise SiteDataError(f"{path}: {len(header)} columns (at most {MAX_COLUMNS} features)")
    seen = set()
    for name in header:
        if name in seen:
            raise SiteDataError(f"{path}: column {name!r} appears twice in the header")
        seen.add(name)
    declared = list(cfg.features) if cfg.features is not None else None
    needed = [cfg.label, *(declared or []), *cfg.ignore]
    missing = [c for c in needed if c not in seen]
    if missing:
        raise SiteDataError(f"{path}: column {missing[0]!r} is missing (columns: {header[:20]})")
    if declared is None:
        declared = [c for c in header if c != cfg.label and c not in cfg.ignore]
        if not declared:
            raise SiteDataError(f"{path}: no feature column besides the label {cfg.label!r}")
    extra = [c for c in header if c not in set(needed)] if cfg.features is not None else []
    if extra:
        raise SiteDataError(f"{path}: column {extra[0]!r} is neither a feature, the label nor ignored "
                            f"(list it in `ignore` to leave it out)")
    return declared


def read_csv(cfg: SiteDataConfig, path: Path) -> RawData:
    with open_bounded(path, cfg.max_bytes) as fh:
        text = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="")
        reader = csv.reader(text)
        try:
            header = [h.strip() for h in next(reader, [])]
            if not header:
                raise SiteDataError(f"{path}: empty file: no header row")
            columns = _columns(header, cfg, path)
            at = {name: header.index(name) for name in header}
            cols, label_col = [at[c] for c in columns], at[cfg.label]
            # one flat array of doubles, not a list per row: what the table costs in memory is
            # then about twice its tensor, checked as it grows
            values, labels, lines = array("d"), [], []
            for row in reader:
                if not row:
                    continue                     # a blank line (e.g. at the end) is no record
                where = f"line {reader.line_num}"
                if len(row) != len(header):
                    raise SiteDataError(f"{path}: {where}: {len(row)} fields, the header has {len(header)}")
                if len(labels) >= cfg.max_rows:
                    raise SiteDataError(f"{path}: more than max_rows = {cfg.max_rows} rows")
                values.extend(_number(row[c], path, header[c], where) for c in cols)
                _check_memory(len(values) * 4, cfg, path)
                labels.append(_label(row[label_col], path, cfg.label, where))
                lines.append(reader.line_num)
        except UnicodeDecodeError as err:
            raise SiteDataError(f"{path}: line {reader.line_num + 1}: not UTF-8 text ({err.reason})") from None
        except csv.Error as err:
            raise SiteDataError(f"{path}: line {reader.line_num}: not valid CSV: {err}") from None
    if not labels:
        raise SiteDataError(f"{path}: no data rows after the header")
    features = np.frombuffer(values, dtype=np.float64).reshape(len(labels), len(columns)).astype(np.float32)
    return RawData(labels=labels, where=lambda i: f"line {lines[i]}",
                   features=torch.from_numpy(features), feature_names=tuple(columns))


def _number(text: str, path: Path, column: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SiteDataError(f"{path}: {column}: {where}: {text[:40]!r} is not a number") from None
    if not math.isfinite(value) or abs(value) > 3.0e38:   # beyond float32: it would become inf
        raise SiteDataError(f"{path}: {column}: {where}: {text[:40]!r} is not a finite number")
    return value


def _check_memory(nbytes: int, cfg: SiteDataConfig, path: Path) -> None:
    if nbytes > cfg.max_bytes:
        raise SiteDataError(f"{path}: the decoded data take {nbytes} bytes, more than max_bytes = {cfg.max_bytes}")


def read_parquet(cfg: SiteDataConfig, path: Path) -> RawData:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_bounded(path, cfg.max_bytes) as fh:
        try:
            pf = pq.ParquetFile(fh)
            meta = pf.metadata
            # the footer says what decoding will cost: refuse before any row group is read
            if meta.num_rows > cfg.max_rows:
                raise SiteDataError(f"{path}: {meta.num_rows} rows, more than max_rows = {cfg.max_rows}")
            decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            _check_memory(decoded, cfg, path)
            header = list(pf.schema_arrow.names)
            columns = _columns(header, cfg, path)
            table = pf.read(columns=[*columns, cfg.label])
        except (pa.ArrowException, OSError) as err:
            raise SiteDataError(f"{path}: not a readable Parquet file: {err}") from None
    if table.num_rows == 0:
        raise SiteDataError(f"{path}: no data rows")
    features = np.empty((table.num_rows, len(columns)), dtype=np.float32)
    for j, name in enumerate(columns):
        features[:, j] = _parquet_numbers(table.column(name), path, name)
    labels = _parquet_labels(table.column(cfg.label), path, cfg.label)
    return RawData(labels=labels, where=lambda i: f"row {i + 1}", features=torch.from_numpy(features),
                   feature_names=tuple(columns))


def _first_null(column) -> int:
    import pyarrow.compute as pc

    return int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])


def _parquet_numbers(column, path: Path, name: str) -> np.ndarray:
    import pyarrow as pa

    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise SiteDataError(f"{path}: {name}: column of type {kind} is not numeric")
    if column.null_count:
        raise SiteDataError(f"{path}: {name}: row {_first_null(column) + 1}: missing value")
    values = column.to_numpy().astype(np.float64)
    bad = ~np.isfinite(values) | (np.abs(values) > 3.0e38)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise SiteDataError(f"{path}: {name}: row {row + 1}: {float(values[row])!r} is not a finite number")
    return values.astype(np.float32)


def _parquet_labels(column, path: Path, name: str) -> list[str]:
    import pyarrow as pa

    kind = column.type
    if pa.types.is_dictionary(kind):          # pandas' categoricals
        column = column.cast(kind.value_type)
        kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise SiteDataError(f"{path}: {name}: label column of type {kind} (expected text or integers)")
    if column.null_count:
        raise SiteDataError(f"{path}: {name}: row {_first_null(column) + 1}: the label is empty")
    return [_label(v, path, name, f"row {i + 1}") for i, v in enumerate(column.to_pylist())]


def read_jsonl(cfg: SiteDataConfig, path: Path) -> RawData:
    texts, labels, lines = [], [], []
    with open_bounded(path, cfg.max_bytes) as fh:
        number = 0
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            number += 1
            where = f"line {number}"
            if len(raw) > MAX_LINE_BYTES:
                raise SiteDataError(f"{path}: {where}: longer than {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            if len(texts) >= cfg.max_rows:
                raise SiteDataError(f"{path}: more than max_rows = {cfg.max_rows} lines")
            record = _json_record(raw, path, where)
            texts.append(_text(record, cfg.text_field, path, where))
            if cfg.label not in record:
                raise SiteDataError(f"{path}: {cfg.label}: {where}: the field is missing")
            labels.append(_label(record[cfg.label], path, cfg.label, where))
            lines.append(number)
    if not texts:
        raise SiteDataError(f"{path}: no records")
    return RawData(labels=labels, where=lambda i: f"line {lines[i]}", texts=texts)


def _json_record(raw: bytes, path: Path, where: str) -> dict:
    try:
        record = loads_json(raw, what=f"{path}: {where}")
    except BoundedInputError as err:
        raise SiteDataError(str(err)) from None
    except UnicodeDecodeError:
        raise SiteDataError(f"{path}: {where}: not UTF-8 text") from None
    except ValueError as err:
        raise SiteDataError(f"{path}: {where}: not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise SiteDataError(f"{path}: {where}: expected a JSON object, got {type(record).__name__}")
    return record


def _text(record: dict, name: str, path: Path, where: str) -> str:
    if name not in record:
        raise SiteDataError(f"{path}: {name}: {where}: the field is missing")
    text = record[name]
    if not isinstance(text, str):
        raise SiteDataError(f"{path}: {name}: {where}: expected a string, got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise SiteDataError(f"{path}: {name}: {where}: longer than {MAX_TEXT_CHARS} characters")
    return text


def read_image_folder(cfg: SiteDataConfig, path: Path) -> RawData:
    """One sub-folder per class, named by its label, holding images of exactly image_size and
    the mode `channels` implies; nothing is resized or converted, so that every site feeds the
    model the same kind of input or is told why not."""
    if not path.is_dir():
        raise SiteDataError(f"{path}: path: not a folder (format image_folder: one sub-folder per class)")
    root = path.resolve()
    height, width = cfg.image_size
    files, labels = _image_files(root, path, cfg)
    _check_memory(len(files) * cfg.channels * height * width * 4, cfg, path)
    images = np.empty((len(files), cfg.channels, height, width), dtype=np.float32)
    for i, file in enumerate(files):
        images[i] = _decode(file, file.relative_to(root), cfg, path)
    return RawData(labels=labels, where=lambda i: f"file {files[i].relative_to(root)}",
                   images=torch.from_numpy(images))


def _inside(entry: Path, root: Path, path: Path) -> Path:
    """`entry`, refused when it is a link that leads out of the data folder (an export that
    links to /etc/... must not feed another file into training)."""
    real = entry.resolve()
    if not real.is_relative_to(root):
        raise SiteDataError(f"{path}: {entry.relative_to(root)}: a link that leads outside the data folder")
    return real


def _entries(folder: Path, limit: int, path: Path) -> list[Path]:
    """The folder's entries, sorted, refused past `limit` while they are listed (a folder of
    millions of files is not read into memory first). Hidden entries (.DS_Store,
    .ipynb_checkpoints) are tools' litter, not data."""
    out = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if len(out) >= limit:
                raise SiteDataError(f"{path}: more than max_rows = {limit} entries in {folder.name}")
            out.append(folder / entry.name)
    return sorted(out)


def _image_files(root: Path, path: Path, cfg: SiteDataConfig) -> tuple[list[Path], list[str]]:
    files, labels = [], []
    for folder in _entries(root, min(cfg.max_rows, MAX_LABELS), path):
        if not _inside(folder, root, path).is_dir():
            raise SiteDataError(f"{path}: {folder.name}: not a class folder (format image_folder: "
                                f"one sub-folder per class, images inside)")
        name = _label(folder.name, path, "image_folder", f"folder {folder.name!r}")
        for file in _entries(folder, cfg.max_rows, path):
            real = _inside(file, root, path)
            if not real.is_file():
                raise SiteDataError(f"{path}: {file.relative_to(root)}: not an image file (class folders do not nest)")
            if len(files) >= cfg.max_rows:
                raise SiteDataError(f"{path}: more than max_rows = {cfg.max_rows} images")
            files.append(file)
            labels.append(name)
    if not files:
        raise SiteDataError(f"{path}: no images (format image_folder: one sub-folder per class, images inside)")
    return files, labels


def _decode(file: Path, name: Path, cfg: SiteDataConfig, path: Path) -> np.ndarray:
    from PIL import Image

    height, width = cfg.image_size
    with open_bounded(file, MAX_IMAGE_FILE_BYTES) as fh:
        try:
            with Image.open(fh, formats=IMAGE_FORMATS) as img:
                # the header's size is checked before any pixel is decoded (a decompression bomb
                # is a small file with a huge size)
                if img.size != (width, height):
                    raise SiteDataError(f"{path}: {name}: {img.size[1]}x{img.size[0]} pixels, "
                                        f"image_size is {height}x{width}")
                if img.mode != IMAGE_MODES[cfg.channels]:
                    raise SiteDataError(f"{path}: {name}: mode {img.mode}, channels = {cfg.channels} needs "
                                        f"mode {IMAGE_MODES[cfg.channels]}")
                pixels = np.asarray(img, dtype=np.uint8)
        except SiteDataError:
            raise
        except Exception as err:   # Pillow raises many kinds (OSError, SyntaxError, ValueError, bombs)
            raise SiteDataError(f"{path}: {name}: not a decodable image: {type(err).__name__}: {err}") from None
    pixels = pixels.reshape(height, width, cfg.channels).transpose(2, 0, 1)
    return pixels.astype(np.float32) / 255.0
