"""A small BERT encoder with a classification head, weight-compatible with all-MiniLM-L6-v2.

Written out here (about a hundred lines) rather than taken from `transformers` so that the teacher
and the students are plain torch modules: MixKD needs the word embeddings apart from the rest
(`embed` / `classify`), students need a pruned vocabulary and fewer layers, Opacus needs only
Linear, LayerNorm and Embedding layers, and loading needs no hub and no remote code. Parameter
names follow Hugging Face's BertModel, so the MiniLM safetensors load as they are.

A student may use a subset of the teacher's vocabulary: `id_map` (a buffer) maps the teacher's
token ids to the student's rows, unknown ones to [UNK], so teacher and student read the same batch.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_core.distill.mixkd import MixableModule

UNK_ID = 100  # [UNK] in the MiniLM / BERT uncased vocabulary


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522        # rows of the word-embedding table
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab: int = 2
    num_labels: int = 3
    dropout: float = 0.1
    ln_eps: float = 1e-12
    input_vocab: int = 30522       # ids the model accepts (the tokenizer's); > vocab_size when pruned

    def validate(self) -> "BertConfig":
        for name in ("vocab_size", "hidden", "layers", "heads", "intermediate", "max_positions", "num_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden: {self.hidden} is not a multiple of heads ({self.heads})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.input_vocab < self.vocab_size:
            raise ValueError("input_vocab: smaller than vocab_size")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "BertConfig":
        data = json.loads(text)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown BertConfig field(s) {sorted(unknown)}")
        return cls(**data).validate()

    @classmethod
    def from_hf(cls, hf: Mapping, num_labels: int) -> "BertConfig":
        if hf.get("model_type") != "bert" or hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"not a BERT model with absolute positions: {hf.get('model_type')!r}")
        return cls(vocab_size=hf["vocab_size"], hidden=hf["hidden_size"], layers=hf["num_hidden_layers"],
                   heads=hf["num_attention_heads"], intermediate=hf["intermediate_size"],
                   max_positions=hf["max_position_embeddings"], type_vocab=hf["type_vocab_size"],
                   num_labels=num_labels, ln_eps=hf.get("layer_norm_eps", 1e-12),
                   input_vocab=hf["vocab_size"]).validate()


class _Linear(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.heads, self.dropout = cfg.heads, cfg.dropout

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        b, t, h = x.shape

        def split(z: Tensor) -> Tensor:
            return z.view(b, t, self.heads, h // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, t, h)


class _AttentionOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)


class _Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _AttentionOutput(cfg)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        out = self.output
        return out.LayerNorm(x + out.drop(out.dense(self.self(x, keep))))


class _Layer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Linear(cfg.hidden, cfg.intermediate)
        self.output = _AttentionOutput(cfg)
        self.output.dense = nn.Linear(cfg.intermediate, cfg.hidden)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        x = self.attention(x, keep)
        out = self.output
        return out.LayerNorm(x + out.drop(out.dense(F.gelu(self.intermediate.dense(x)))))


class _Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)


class _Encoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg.layers))


class BertClassifier(MixableModule):
    """BERT encoder, mean pooling over real tokens (how all-MiniLM-L6-v2 was trained to embed a
    sentence), dropout and a linear head. Batches: input_ids [B, T], attention_mask [B, T]."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg.validate()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.head_drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, cfg.num_labels)
        if cfg.input_vocab != cfg.vocab_size:
            self.register_buffer("id_map", torch.full((cfg.input_vocab,), UNK_ID, dtype=torch.long))
        else:
            self.id_map = None
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        ids = batch["input_ids"]
        if self.id_map is not None:
            ids = self.id_map[ids]
        return {"words": self.embeddings.word_embeddings(ids)}

    def classify(self, embedded: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        words, mask = embedded["words"], batch["attention_mask"]
        b, t, _ = words.shape
        e = self.embeddings
        # position and token-type ids as [B, T] (not broadcast [1, T]): Opacus' per-sample
        # gradients of an Embedding need the batch dimension in its input
        positions = torch.arange(t, device=words.device).expand(b, t)
        x = words + e.position_embeddings(positions) + e.token_type_embeddings(torch.zeros_like(positions))
        x = e.drop(e.LayerNorm(x))
        keep = mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, keep)
        m = mask.to(x.dtype).unsqueeze(-1)
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.classifier(self.head_drop(pooled))


# ---------------------------------------------------------------------------------------------
# building students from a teacher (or from the pretrained encoder)
# ---------------------------------------------------------------------------------------------

class StudentTooLargeError(ValueError):
    """A student at least as large as its teacher: distillation would compress nothing."""


@dataclass(frozen=True)
class StudentSpec:
    layers: int = 2
    hidden: int | None = None      # None: the source's (then its first layers are copied)
    vocab: int = 0                 # 0: the source's whole vocabulary; else the K most frequent site tokens
    max_positions: int = 128       # the student never sees longer inputs than the data's max_len
    dropout: float = 0.1

    def validate(self) -> "StudentSpec":
        if self.layers < 1:
            raise ValueError(f"student.layers: must be >= 1, got {self.layers}")
        if self.hidden is not None and self.hidden < 8:
            raise ValueError(f"student.hidden: must be >= 8, got {self.hidden}")
        if self.vocab < 0:
            raise ValueError(f"student.vocab: must be >= 0, got {self.vocab}")
        return self


def check_student_size(student: nn.Module, teacher: nn.Module) -> tuple[int, int]:
    s, t = (sum(p.numel() for p in m.parameters()) for m in (student, teacher))
    if s >= t:
        raise StudentTooLargeError(f"student has {s:,} parameters, not fewer than the teacher's {t:,}: "
                                   "choose fewer layers, a smaller hidden size or a smaller vocabulary")
    return s, t


def build_student(source: BertClassifier, spec: StudentSpec, *, teacher: BertClassifier | None = None,
                  token_counts: Tensor | None = None, seed: int = 0) -> BertClassifier:
    """A smaller BertClassifier initialised from `source` (the pretrained encoder, or the teacher).

    Same hidden size: embeddings and the first `layers` layers are copied (as in the MixKD paper's
    BERT₃/BERT₆ students). Smaller hidden size: the layers start random and the word embeddings
    are the source's projected on their top principal directions, so the student still starts
    with the source's lexical geometry. `vocab` = K keeps the K most frequent tokens of the site's
    training texts (`token_counts`, per teacher id) plus the special tokens."""
    spec.validate()
    teacher = teacher or source
    src = source.config
    hidden = spec.hidden or src.hidden
    if spec.layers > teacher.config.layers:
        raise StudentTooLargeError(f"student.layers: {spec.layers} > the teacher's {teacher.config.layers}")
    if hidden > teacher.config.hidden:
        raise StudentTooLargeError(f"student.hidden: {hidden} > the teacher's {teacher.config.hidden}")
    keep = _kept_tokens(src.input_vocab, spec.vocab, token_counts)
    heads = src.heads if hidden == src.hidden else max(1, hidden // 64)
    cfg = BertConfig(vocab_size=len(keep), hidden=hidden, layers=spec.layers, heads=heads,
                     intermediate=src.intermediate if hidden == src.hidden else 4 * hidden,
                     max_positions=min(spec.max_positions, src.max_positions), type_vocab=src.type_vocab,
                     num_labels=teacher.config.num_labels, dropout=spec.dropout, ln_eps=src.ln_eps,
                     input_vocab=src.input_vocab)
    torch.manual_seed(seed)
    student = BertClassifier(cfg)
    source_words = _source_words(source)[keep]
    with torch.no_grad():
        e, se = student.embeddings, source.embeddings
        if hidden == src.hidden:
            e.word_embeddings.weight.copy_(source_words)
            e.position_embeddings.weight.copy_(se.position_embeddings.weight[:cfg.max_positions])
            e.token_type_embeddings.weight.copy_(se.token_type_embeddings.weight)
            e.LayerNorm.load_state_dict(se.LayerNorm.state_dict())
            for i in range(spec.layers):
                student.encoder.layer[i].load_state_dict(source.encoder.layer[i].state_dict())
        else:
            centred = source_words - source_words.mean(0)
            _, _, v = torch.linalg.svd(centred, full_matrices=False)
            projected = centred @ v[:hidden].T
            e.word_embeddings.weight.copy_(projected * (0.02 * math.sqrt(hidden)) / projected.norm(dim=1, keepdim=True).mean())
        if student.id_map is not None:  # a pruned vocabulary: dropped tokens read as [UNK]
            student.id_map.fill_(int((keep == UNK_ID).nonzero()[0, 0]))
            student.id_map[keep] = torch.arange(len(keep))
    check_student_size(student, teacher)
    return student


def _source_words(source: BertClassifier) -> Tensor:
    """The source's word embeddings indexed by input (tokenizer) id."""
    weight = source.embeddings.word_embeddings.weight.detach()
    return weight if source.id_map is None else weight[source.id_map]


def _kept_tokens(input_vocab: int, k: int, counts: Tensor | None) -> Tensor:
    if k == 0 or k >= input_vocab:
        return torch.arange(input_vocab)
    if counts is None:
        raise ValueError("student.vocab: a pruned vocabulary needs the site's token counts")
    specials = torch.tensor([0, UNK_ID, 101, 102, 103])  # [PAD] [UNK] [CLS] [SEP] [MASK]
    counts = counts.clone().float()
    counts[specials] = -1  # taken anyway
    top = torch.argsort(counts, descending=True, stable=True)[:max(0, k - len(specials))]
    return torch.cat([specials, top.sort().values])
