"""The VLN backbone: shapes, masking, adapters on its cross-modal layers, checkpoints."""
import copy
import json

import pytest
import torch

from kt_core.manifest import Role, manifest_of
from kt_core.models import load_shared_state, private_state, shared_state
from kt_core.train import TrainConfig
from kt_core.vln.adapt import CROSS_ATTENTION, AdapterConfig, adapt_backbone, adapters
from kt_core.vln.backbone import VLNBackbone, VLNConfig, mask_tokens
from kt_core.vln.checkpoint import CheckpointError, card_path, load_backbone, read_card, save_backbone
from kt_core.vln.finetune import DemoTensors, evaluate, train_local
from kt_core.vln.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, Tokenizer

TOK = Tokenizer()


def batch(n=4, cfg=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = ["go to the red ball", "pick up a key on your left", "open the door", "go to the grey box"]
    tokens = torch.from_numpy(TOK.encode_batch([texts[i % 4] for i in range(n)], 12))
    image = torch.stack([torch.randint(0, v, (n, 7, 7), generator=g) for v in (11, 6, 3)], dim=-1).to(torch.uint8)
    return tokens, image, torch.randint(0, 4, (n,), generator=g), torch.randint(0, 7, (n,), generator=g)


def test_shapes_grid_and_panorama():
    model = VLNBackbone(VLNConfig.tiny())
    tokens, image, direction, _ = batch()
    out = model(tokens, image, direction)
    assert out.lang.shape == (4, 12, 16) and out.vision.shape == (4, 50, 16) and out.pooled.shape == (4, 16)
    assert model.action_logits(out).shape == (4, 7) and model.mlm_logits(out).shape == (4, 12, 38)
    pano = VLNBackbone(VLNConfig.tiny(vision="panorama", view_dim=8, num_actions=37))
    logits = pano.act(tokens, torch.randn(4, 36, 8), torch.randn(4, 36, 4))
    assert logits.shape == (4, 37)
    assert not list(model.buffers())        # every tensor is a parameter: roles come from modules


def test_padding_does_not_change_the_output():
    model = VLNBackbone(VLNConfig.tiny()).eval()
    tokens, image, direction, _ = batch()
    short = model.act(tokens[:, :10], image, direction)
    padded = model.act(torch.cat([tokens, torch.zeros(4, 6, dtype=torch.long)], 1), image, direction)
    assert torch.allclose(short, padded, atol=1e-5)


def test_initialization_depends_on_the_config_seed_only():
    torch.manual_seed(123)
    a = VLNBackbone(VLNConfig.tiny())
    torch.manual_seed(456)
    b = VLNBackbone(VLNConfig.tiny())
    c = VLNBackbone(VLNConfig.tiny(seed=1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="d_model: 30 is not divisible by n_heads=4"):
        VLNConfig(d_model=30, n_heads=4).validate()
    with pytest.raises(ValueError, match="vision: 'rgb'"):
        VLNConfig(vision="rgb").validate()
    with pytest.raises(ValueError, match="unknown field"):
        VLNConfig.from_dict({"d_model": 16, "width": 3})
    assert VLNConfig.from_dict(json.loads(VLNConfig.tiny().to_json())) == VLNConfig.tiny()


def test_mask_tokens_masks_only_words_and_at_least_one_per_instruction():
    tokens = torch.from_numpy(TOK.encode_batch(["go to the red ball"] * 200 + ["open the door"] * 200, 10))
    masked, labels = mask_tokens(tokens, 38, 0.15, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert chosen.any(1).all()
    assert not chosen[(tokens == CLS_ID) | (tokens == SEP_ID) | (tokens == PAD_ID)].any()
    assert torch.equal(labels[chosen], tokens[chosen])
    assert torch.equal(masked[~chosen], tokens[~chosen])
    frac = (masked[chosen] == MASK_ID).float().mean()
    assert 0.7 < frac < 0.9                                             # BERT's 80 / 10 / 10
    assert 0.15 <= chosen.sum() / ((tokens > SEP_ID).sum()) < 0.35      # ~15%, plus the forced ones


# -- adapters ---------------------------------------------------------------------------------

@pytest.mark.parametrize("adapter", ["waffle", "lora", "ffa_lora", "dense"])
def test_adapted_backbone_starts_as_the_backbone_and_shares_only_adapters(adapter):
    base = VLNBackbone(VLNConfig.tiny(n_cross_layers=2)).eval()
    tokens, image, direction, _ = batch()
    before = base.act(tokens, image, direction)
    model = adapt_backbone(copy.deepcopy(base), AdapterConfig(adapter=adapter, n_factors=4, lora_rank=2)).eval()
    assert torch.allclose(model.act(tokens, image, direction), before, atol=1e-5)
    wrapped = adapters(model)
    assert len(wrapped) == 2 * (2 * 3 + 2 * (3 + 2))                    # 2 layers x (2 cross + 2 blocks)
    manifest = manifest_of(model)
    shared = shared_state(model)
    for name in shared:
        assert name.startswith("cross_layers.") or name.startswith("action_head."), name
    # the frozen backbone never appears in what may leave a site
    for name in ("tok_emb.weight", "lang_layers.0.attn.query.weight", "vision_encoder.values.0.weight",
                 "mlm_decoder.weight", "pooler.weight"):
        assert manifest.role_of(name) is Role.FROZEN
    frozen_base = {"waffle": "w0", "lora": "w0", "ffa_lora": "w0", "dense": None}[adapter]
    if frozen_base:
        assert manifest.role_of(f"cross_layers.0.lang_cross.query.{frozen_base}") is Role.FROZEN
        assert not any(n.endswith(".w0") for n in shared)
    if adapter == "waffle":
        assert set(private_state(model)) and all("gate_logits" in n or "kuma" in n for n in private_state(model))
    assert all(p.requires_grad == (manifest.role_of(n) is not Role.FROZEN) for n, p in model.named_parameters())


def test_targets_select_layers_and_bad_targets_are_refused():
    model = adapt_backbone(VLNBackbone(VLNConfig.tiny()), AdapterConfig(targets=CROSS_ATTENTION, train_head=False))
    assert sorted(adapters(model)) == sorted(f"cross_layers.0.{s}.{l}" for s in ("lang_cross", "vis_cross")
                                             for l in ("query", "key_value", "proj"))
    assert not any(n.startswith("action_head") for n in shared_state(model))
    with pytest.raises(ValueError, match="match no linear layer"):
        adapt_backbone(VLNBackbone(VLNConfig.tiny()), AdapterConfig(targets=("nothing.*",)))
    with pytest.raises(ValueError, match="adapter"):
        AdapterConfig(adapter="bitfit").validate()


def test_local_training_moves_adapters_only_and_is_deterministic():
    base = VLNBackbone(VLNConfig.tiny())
    tokens, image, direction, actions = batch(32)
    data = DemoTensors(tokens, image, direction, actions)
    runs = []
    for _ in range(2):
        model = adapt_backbone(copy.deepcopy(base), AdapterConfig(n_factors=4))
        frozen = {n: t.clone() for n, t in model.state_dict().items() if manifest_of(model).role_of(n) is Role.FROZEN}
        res = train_local(model, data, TrainConfig(epochs=2, batch_size=8, lr=1e-2, optimizer="adam"))
        assert res.steps == 8 and res.num_samples == 32
        assert all(torch.equal(model.state_dict()[n], t) for n, t in frozen.items())
        runs.append(shared_state(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    # what a coordinator sends back loads strictly
    fresh = adapt_backbone(copy.deepcopy(base), AdapterConfig(n_factors=4))
    load_shared_state(fresh, runs[0])
    metrics = evaluate(fresh, data)
    assert 0 <= metrics["accuracy"] <= 1 and metrics["loss"] > 0


# -- checkpoints ------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    model = VLNBackbone(VLNConfig.tiny())
    card = save_backbone(model, TOK, tmp_path / "backbone.safetensors", {"steps": 3})
    return tmp_path / "backbone.safetensors", model, card


def test_checkpoint_round_trip(checkpoint):
    path, model, card = checkpoint
    assert card_path(path).name == "backbone.card.json" and read_card(path)["steps"] == 3
    loaded = load_backbone(path)
    assert loaded.config == model.cfg and loaded.tokenizer.vocab == TOK.vocab
    assert loaded.sha256 == card["checkpoint"]["sha256"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))
    assert load_backbone(path, sha256=card["checkpoint"]["sha256"], config=VLNConfig.tiny()).model is not None


def test_checkpoint_with_wrong_digest_is_refused(checkpoint):
    path, _, card = checkpoint
    with pytest.raises(CheckpointError, match="does not match the expected 0000"):
        load_backbone(path, sha256="0" * 64)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="SHA-256 .* does not match"):
        load_backbone(path)                                            # the card's digest


def test_checkpoint_for_another_architecture_is_refused(checkpoint, tmp_path):
    path, _, _ = checkpoint
    with pytest.raises(CheckpointError, match="architecture mismatch: d_model 16 in the checkpoint, 32 expected"):
        load_backbone(path, config=VLNConfig.tiny(d_model=32))
    # a header that claims one architecture over tensors of another
    from safetensors.torch import save_file
    other = VLNBackbone(VLNConfig.tiny(n_cross_layers=2))
    bad = tmp_path / "bad.safetensors"
    save_file(other.state_dict(), str(bad), metadata={"format": "ktfed-vln-backbone/1",
                                                      "config": VLNConfig.tiny().to_json(), "tokenizer": TOK.to_json()})
    from kt_core.vln.checkpoint import sha256_file
    with pytest.raises(CheckpointError, match="unexpected tensors \\['cross_layers.1"):
        load_backbone(bad, sha256=sha256_file(bad))


def test_missing_checkpoint_card_or_adapted_model_is_refused(checkpoint, tmp_path):
    path, model, _ = checkpoint
    with pytest.raises(CheckpointError, match="file not found"):
        load_backbone(tmp_path / "nope.safetensors", sha256="0" * 64)
    card_path(path).unlink()
    with pytest.raises(CheckpointError, match="model card .*file not found"):
        load_backbone(path)
    with pytest.raises(CheckpointError, match="has adapters"):
        save_backbone(adapt_backbone(copy.deepcopy(model), AdapterConfig()), TOK, tmp_path / "x.safetensors")
