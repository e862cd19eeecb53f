"""The VLN backbone: a small LXMERT-style cross-modal transformer (PREVALENT, Hao et al. CVPR 2020).

    instruction tokens -> language encoder (self-attention layers)  --\
                                                                       cross-modal layers -> [CLS] -> action
    observation        -> vision encoder   (self-attention layers)  --/        |
                                                                       language stream -> masked words (MLM)

A cross-modal layer lets each stream attend to the other (language queries vision, vision queries
language, both from the previous layer's outputs), then runs self-attention and a feed-forward
network per stream. All blocks are pre-LayerNorm. The observation is either a BabyAI egocentric
grid (7 x 7 cells of (object, colour, state) + the facing direction) or an R2R-style panorama
(36 view features + sin/cos heading and elevation per view). With `memory` > 0 the grid
observation also carries the episode's last `memory` frames and actions, one visual token each
(kt_core.vln.memory; in the spirit of recurrent VLN-BERT's state, in a form that batches by step).

Every linear layer is a plain nn.Linear, so `kt_core.vln.adapt` can swap the cross-modal ones for
WAFFLe / LoRA adapters. The model holds parameters only (no buffers), so every tensor's role in
the factor manifest is decided by its module or by requires_grad.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_core.vln.tokenizer import PAD_ID

VISIONS = ("grid", "panorama")
MAX_MEMORY = 64         # past steps; each is one more visual token at every step


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class VLNConfig:
    vocab_size: int = 38
    max_len: int = 24               # instruction tokens including [CLS] and [SEP]
    d_model: int = 96
    n_heads: int = 4
    n_lang_layers: int = 1
    n_vision_layers: int = 1
    n_cross_layers: int = 2
    ffn_mult: int = 2               # feed-forward width = ffn_mult * d_model
    dropout: float = 0.0
    vision: str = "grid"            # grid (BabyAI) | panorama (R2R-style)
    grid_size: int = 7
    grid_values: tuple[int, int, int] = (11, 6, 3)   # object, colour, state value ranges
    n_directions: int = 4
    n_views: int = 36
    view_dim: int = 32              # panorama: feature size of one view
    angle_dim: int = 4              # sin/cos heading, sin/cos elevation
    num_actions: int = 7
    memory: int = 0                 # past steps of the episode the model sees (kt_core.vln.memory); 0: reactive
    memory_actions: bool = True     # with memory: also the action taken at each past step
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.grid_values, list):   # a config that went through JSON / TOML
            object.__setattr__(self, "grid_values", tuple(self.grid_values))

    @classmethod
    def tiny(cls, **kw) -> VLNConfig:
        """Small enough for unit tests: a forward pass on a batch takes milliseconds."""
        base = dict(d_model=16, n_heads=2, n_lang_layers=1, n_vision_layers=1, n_cross_layers=1, ffn_mult=2)
        base.update(kw)
        return cls(**base)

    def validate(self) -> None:
        for name in ("vocab_size", "max_len", "d_model", "n_heads", "ffn_mult", "grid_size", "n_directions",
                     "n_views", "view_dim", "angle_dim", "num_actions"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        for name in ("n_lang_layers", "n_vision_layers", "n_cross_layers"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"{name}: must be a non-negative integer, got {v!r}")
        if self.n_cross_layers < 1:
            raise ValueError("n_cross_layers: must be >= 1 (the cross-modal layers are the backbone)")
        if self.vocab_size < 6:
            raise ValueError(f"vocab_size: must cover the 5 special tokens and a word, got {self.vocab_size}")
        if self.max_len < 3:
            raise ValueError(f"max_len: must be >= 3 ([CLS] word [SEP]), got {self.max_len}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model: {self.d_model} is not divisible by n_heads={self.n_heads}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) \
                or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be a number in [0, 1), got {self.dropout!r}")
        if self.vision not in VISIONS:
            raise ValueError(f"vision: {self.vision!r} is not one of {list(VISIONS)}")
        if not isinstance(self.grid_values, tuple) or len(self.grid_values) != 3 \
                or not all(_is_int(v) and v >= 1 for v in self.grid_values):
            raise ValueError(f"grid_values: must be 3 positive integers, got {self.grid_values!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed: must be a non-negative integer, got {self.seed!r}")
        if not _is_int(self.memory) or not 0 <= self.memory <= MAX_MEMORY:
            raise ValueError(f"memory: must be an integer in 0..{MAX_MEMORY}, got {self.memory!r}")
        if self.memory and self.vision != "grid":
            raise ValueError(f"memory: past frames are built for the grid observation, not {self.vision!r}")
        if not isinstance(self.memory_actions, bool):
            raise ValueError(f"memory_actions: must be true or false, got {self.memory_actions!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid_values"] = list(self.grid_values)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> VLNConfig:
        if not isinstance(d, dict):
            raise ValueError(f"VLNConfig: expected a mapping, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"VLNConfig: unknown field(s) {sorted(unknown)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention of `x` over `context` (self-attention when context is x)."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.query = nn.Linear(d, d)
        self.key_value = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        b, n, d = x.shape
        h = self.n_heads
        q = self.query(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.key_value(context).split(d, dim=2)
        k = k.view(b, -1, h, d // h).transpose(1, 2)
        v = v.view(b, -1, h, d // h).transpose(1, 2)
        # context_mask: B x M, True where a key may be attended to (not padding)
        mask = None if context_mask is None else context_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, d: int, mult: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d, mult * d)
        self.proj = nn.Linear(mult * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """A single-stream transformer layer: self-attention then feed-forward."""

    def __init__(self, cfg: VLNConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_mult, cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        h = self.ln_attn(x)
        x = x + self.attn(h, h, mask)
        return x + self.ffn(self.ln_ffn(x))


class CrossModalLayer(nn.Module):
    """LXMERT's cross-modality layer: both cross-attentions read the previous layer's outputs of
    the other stream (computed in parallel, not one after the other), then a Block per stream."""

    def __init__(self, cfg: VLNConfig):
        super().__init__()
        d = cfg.d_model
        self.ln_lang, self.ln_vis = nn.LayerNorm(d), nn.LayerNorm(d)
        self.lang_cross = Attention(d, cfg.n_heads, cfg.dropout)    # language queries vision
        self.vis_cross = Attention(d, cfg.n_heads, cfg.dropout)     # vision queries language
        self.lang_block, self.vis_block = Block(cfg), Block(cfg)

    def forward(self, lang: Tensor, vis: Tensor, lang_mask: Tensor,
                vis_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        hl, hv = self.ln_lang(lang), self.ln_vis(vis)
        lang = lang + self.lang_cross(hl, hv, vis_mask)
        vis = vis + self.vis_cross(hv, hl, lang_mask)
        return self.lang_block(lang, lang_mask), self.vis_block(vis, vis_mask)


class GridEncoder(nn.Module):
    """BabyAI observation -> 49 cell tokens + 1 direction token (+ one token per past frame).

    A cell's token is the sum of embeddings of its object, colour and state values and of its
    position in the egocentric view; the facing direction (absolute, 0..3) is one more token,
    since "on your left" in a mission refers to the agent's orientation at the start.

    With memory (kt_core.vln.memory), each past frame is one token: the sum over its cells of an
    embedding of (position, value) per channel (a linear map of the whole one-hot frame, so where
    things were is kept), plus its direction, its age and the action taken there. One token per
    frame keeps a step's cost close to a reactive model's."""

    def __init__(self, cfg: VLNConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.values = nn.ModuleList(nn.Embedding(n, d) for n in cfg.grid_values)
        self.cell_pos = nn.Embedding(cfg.grid_size * cfg.grid_size, d)
        self.direction = nn.Embedding(cfg.n_directions, d)
        self.ln = nn.LayerNorm(d)
        if cfg.memory:
            cells = cfg.grid_size * cfg.grid_size
            self.past_values = nn.ModuleList(nn.Embedding(cells * n, d) for n in cfg.grid_values)
            self.past_direction = nn.Embedding(cfg.n_directions, d)
            self.past_age = nn.Embedding(cfg.memory, d)
            self.past_action = nn.Embedding(cfg.num_actions, d) if cfg.memory_actions else None
            self.past_ln = nn.LayerNorm(d)

    def current(self, image: Tensor, direction: Tensor) -> Tensor:
        cells = image.long().flatten(1, 2)                                 # B x 49 x 3
        x = sum(emb(cells[..., c]) for c, emb in enumerate(self.values)) + self.cell_pos.weight
        x = torch.cat([self.direction(direction.long())[:, None, :], x], dim=1)
        return self.ln(x)

    def past(self, frames: Tensor, pose: Tensor) -> Tensor:
        """frames B x M x 7 x 7 x 3, pose B x M x (direction, action) -> B x M x d."""
        cells = frames.long().flatten(2, 3)                                # B x M x 49 x 3
        where = torch.arange(cells.shape[2], device=cells.device)          # cell positions 0..48
        x = sum(emb(where * n + cells[..., c]).sum(2)
                for c, (emb, n) in enumerate(zip(self.past_values, self.cfg.grid_values)))
        x = x + self.past_direction(pose[..., 0].long()) + self.past_age.weight
        if self.past_action is not None:
            # EMPTY frames are masked out of attention; any in-range id does for them
            x = x + self.past_action(pose[..., 1].long().clamp(max=self.cfg.num_actions - 1))
        return self.past_ln(x)

    def forward(self, image: Tensor, direction: Tensor) -> Tensor:
        m = self.cfg.memory
        if not m:
            return self.current(image, direction)
        if image.dim() != 5 or image.shape[1] != m + 1 or direction.shape != (image.shape[0], m + 1, 2):
            raise ValueError(f"observation: memory={m} needs B x {m + 1} x 7 x 7 x 3 frames and B x {m + 1} x 2 "
                             f"poses (kt_core.vln.memory), got {tuple(image.shape)} and {tuple(direction.shape)}")
        return torch.cat([self.current(image[:, 0], direction[:, 0, 0]), self.past(image[:, 1:], direction[:, 1:])], 1)


class PanoramaEncoder(nn.Module):
    """R2R-style panorama -> one token per view: projected view feature + projected angles."""

    def __init__(self, cfg: VLNConfig):
        super().__init__()
        self.feature = nn.Linear(cfg.view_dim, cfg.d_model)
        self.angle = nn.Linear(cfg.angle_dim, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model)

    def forward(self, features: Tensor, angles: Tensor) -> Tensor:
        return self.ln(self.feature(features.float()) + self.angle(angles.float()))


# ---------------------------------------------------------------------------------------------
# the backbone
# ---------------------------------------------------------------------------------------------

@dataclass
class VLNOutput:
    lang: Tensor        # B x L x d: the language stream after the cross-modal layers
    vision: Tensor      # B x V x d
    pooled: Tensor      # B x d: tanh(W h_[CLS]), the input of the action head


class VLNBackbone(nn.Module):
    def __init__(self, cfg: VLNConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        with torch.random.fork_rng(devices=[]):
            # the initial weights are a function of cfg.seed alone, not of the caller's RNG state
            torch.manual_seed(cfg.seed)
            self.tok_emb = nn.Embedding(cfg.vocab_size, d)
            self.pos_emb = nn.Embedding(cfg.max_len, d)
            self.ln_emb = nn.LayerNorm(d)
            self.drop = nn.Dropout(cfg.dropout)
            self.lang_layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_lang_layers))
            self.vision_encoder = GridEncoder(cfg) if cfg.vision == "grid" else PanoramaEncoder(cfg)
            self.vision_layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_vision_layers))
            self.cross_layers = nn.ModuleList(CrossModalLayer(cfg) for _ in range(cfg.n_cross_layers))
            self.ln_lang, self.ln_vis = nn.LayerNorm(d), nn.LayerNorm(d)
            self.pooler = nn.Linear(d, d)
            self.action_head = nn.Linear(d, cfg.num_actions)
            # BERT's prediction head: transform, then scores over the vocabulary
            self.mlm_transform = nn.Linear(d, d)
            self.mlm_ln = nn.LayerNorm(d)
            self.mlm_decoder = nn.Linear(d, cfg.vocab_size)
            self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        # GPT-2 / BERT initialization: N(0, 0.02) weights, zero biases
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor, observation: Tensor, pose: Tensor) -> VLNOutput:
        """tokens: B x L instruction ids (L <= max_len, [PAD] = 0); observation, pose: the grid
        image (B x 7 x 7 x 3) and direction (B), or view features (B x 36 x F) and angles (B x 36 x 4);
        with memory, the stacks of frames and (direction, action) of kt_core.vln.memory."""
        b, n = tokens.shape
        if n > self.cfg.max_len:
            raise ValueError(f"tokens: {n} per instruction, more than max_len={self.cfg.max_len}")
        lang_mask = tokens != PAD_ID
        lang = self.drop(self.ln_emb(self.tok_emb(tokens) + self.pos_emb.weight[:n]))
        for layer in self.lang_layers:
            lang = layer(lang, lang_mask)
        vis = self.drop(self.vision_encoder(observation, pose))
        vis_mask = self.vision_mask(pose)
        for layer in self.vision_layers:
            vis = layer(vis, vis_mask)
        for layer in self.cross_layers:
            lang, vis = layer(lang, vis, lang_mask, vis_mask)
        lang, vis = self.ln_lang(lang), self.ln_vis(vis)
        return VLNOutput(lang, vis, torch.tanh(self.pooler(lang[:, 0])))

    def vision_mask(self, pose: Tensor) -> Tensor | None:
        """B x V, True on the visual tokens that exist; None (all of them) without memory."""
        if not self.cfg.memory:
            return None
        from kt_core.vln.memory import history_mask

        past = history_mask(pose, self.cfg.num_actions)
        return torch.cat([past.new_ones(past.shape[0], 1 + self.cfg.grid_size ** 2), past], dim=1)

    def action_logits(self, out: VLNOutput) -> Tensor:
        return self.action_head(out.pooled)

    def mlm_logits(self, out: VLNOutput) -> Tensor:
        """Scores over the vocabulary at every language position (B x L x vocab)."""
        return self.mlm_decoder(self.mlm_ln(F.gelu(self.mlm_transform(out.lang))))

    def act(self, tokens: Tensor, observation: Tensor, pose: Tensor) -> Tensor:
        """Action logits in one call: what behaviour cloning and rollouts use."""
        return self.action_logits(self(tokens, observation, pose))


def build_backbone(cfg: VLNConfig) -> VLNBackbone:
    return VLNBackbone(cfg)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def mask_tokens(tokens: Tensor, vocab_size: int, prob: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """BERT masking of instruction words: choose ~prob of the word positions (never [CLS], [SEP],
    [PAD]; at least one per instruction), replace 80% of them by [MASK], 10% by a random word, keep
    10%. Returns (masked tokens, labels) with labels -100 where nothing is predicted."""
    from kt_core.vln.tokenizer import CLS_ID, MASK_ID, SEP_ID, SPECIALS

    words = (tokens != PAD_ID) & (tokens != CLS_ID) & (tokens != SEP_ID)
    dev = tokens.device        # the generator is a CPU one, so the draws are the same on any device
    u = torch.rand(tokens.shape, generator=generator).to(dev)
    chosen = words & (u < prob)
    # instructions with no chosen word get their lowest-u word: every row contributes to the loss
    u_words = torch.where(words, u, torch.full_like(u, math.inf))
    forced = torch.zeros_like(chosen).scatter_(1, u_words.argmin(1, keepdim=True), True) & words
    chosen = chosen | (forced & ~chosen.any(1, keepdim=True))
    labels = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    r = torch.rand(tokens.shape, generator=generator).to(dev)
    random_words = torch.randint(len(SPECIALS), vocab_size, tokens.shape, generator=generator).to(dev)
    masked = torch.where(chosen & (r < 0.8), torch.full_like(tokens, MASK_ID), tokens)
    masked = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_words, masked)
    return masked, labels
