"""MixKD's loss pieces on hand-computed cases, its config checks, and the objectives' interface."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kt_core.distill.loop import DictDataset, EmptyDatasetError, evaluate, fit
from kt_core.config_file import ConfigError
from kt_core.distill.mixkd import (DistillConfig, LossWeights, Mix, MixableModule, kd_loss,
                                   make_objective, mix_tensor, mixed_batch, mixup_ce, sample_mix)

torch.set_num_threads(1)


class TinyMixable(MixableModule):
    """Embedding bag classifier: enough structure to check that mixing happens on embeddings."""

    def __init__(self, vocab=20, dim=8, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, classes)

    def embed(self, batch):
        return {"words": self.emb(batch["input_ids"])}

    def classify(self, embedded, batch):
        m = batch["attention_mask"].float().unsqueeze(-1)
        return self.out((embedded["words"] * m).sum(1) / m.sum(1).clamp_min(1))


def toy_batch(b=4, t=5, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 3, (b,), generator=g)}


def test_kd_loss_hand_computed():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    # T=1: KL(p_t || p_s) with p_t = (1/2, 1/2), p_s = softmax(1, 0)
    p_s = torch.softmax(s, -1)[0]
    expected = 0.5 * math.log(0.5 / p_s[0]) + 0.5 * math.log(0.5 / p_s[1])
    assert kd_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-5)
    # T=2: logits divided by 2, loss multiplied by 4
    p_s2 = torch.softmax(s / 2, -1)[0]
    expected2 = 4 * (0.5 * math.log(0.5 / p_s2[0]) + 0.5 * math.log(0.5 / p_s2[1]))
    assert kd_loss(s, t, 2.0).item() == pytest.approx(expected2, rel=1e-5)
    assert kd_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_mixing_is_convex_and_lambda_one_is_identity():
    x = torch.randn(4, 3, 2)
    perm = torch.tensor([1, 0, 3, 2])
    lam = torch.tensor([1.0, 0.0, 0.25, 0.5])
    mixed = mix_tensor(x, Mix(perm, lam))
    assert torch.allclose(mixed[0], x[0])                      # λ = 1: the example itself
    assert torch.allclose(mixed[1], x[0])                      # λ = 0: its partner
    assert torch.allclose(mixed[2], 0.25 * x[2] + 0.75 * x[3])
    assert torch.allclose(mixed[3], 0.5 * x[3] + 0.5 * x[2])
    # every coordinate stays between its two parents' values
    lo, hi = torch.minimum(x, x[perm]), torch.maximum(x, x[perm])
    assert bool(((mixed >= lo - 1e-6) & (mixed <= hi + 1e-6)).all())


def test_mixed_masks_are_the_union_of_contributing_parents():
    batch = {"attention_mask": torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]]), "labels": torch.tensor([0, 1, 2])}
    out = mixed_batch(batch, Mix(torch.tensor([1, 0, 0]), torch.tensor([0.3, 0.7, 1.0])))
    assert out["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    out = mixed_batch(batch, Mix(torch.tensor([2, 2, 1]), torch.tensor([1.0, 0.0, 0.5])))
    assert out["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 1]]  # λ = 1: own; λ = 0: partner's
    assert out["labels"].tolist() == [0, 1, 2]  # labels are mixed in the loss, not here


def test_mixup_ce_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1])
    mix = Mix(torch.tensor([1, 0]), torch.tensor([0.25, 1.0]))
    ce = F.cross_entropy(logits, torch.tensor([0, 1]), reduction="none")
    ce_partner = F.cross_entropy(logits, torch.tensor([1, 0]), reduction="none")
    expected = ((0.25 * ce[0] + 0.75 * ce_partner[0]) + ce[1]) / 2
    assert mixup_ce(logits, labels, mix).item() == pytest.approx(expected.item(), rel=1e-6)


def test_sampled_lambdas_follow_beta_and_are_reproducible():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = sample_mix(4000, 0.4, g1), sample_mix(4000, 0.4, g2)
    assert torch.equal(a.lam, b.lam) and torch.equal(a.perm, b.perm)
    assert float(a.lam.min()) >= 0 and float(a.lam.max()) <= 1
    assert float(a.lam.mean()) == pytest.approx(0.5, abs=0.03)
    # Beta(0.4, 0.4) has variance 1 / (4 (2·0.4 + 1)) = 0.1389: mostly near 0 or 1
    assert float(a.lam.var()) == pytest.approx(1 / (4 * 1.8), abs=0.01)
    assert sorted(a.perm.tolist()) == list(range(4000))


def test_mixkd_with_lambda_one_reduces_to_kd_and_ce(monkeypatch):
    """With λ = 1 each virtual example is its original: mix_kd = kd and mix_ce = ce."""
    import kt_core.distill.mixkd as mixkd

    def lam_one(n, alpha, generator, device="cpu"):
        return Mix(torch.randperm(n, generator=generator), torch.ones(n))

    monkeypatch.setattr(mixkd, "sample_mix", lam_one)
    student, teacher = TinyMixable(seed=1).eval(), TinyMixable(seed=2).eval()
    batch = toy_batch()
    cfg = DistillConfig(method="mixkd", temperature=2.0)
    _, parts = make_objective(cfg).loss(student, teacher, batch, torch.Generator().manual_seed(0))
    assert parts["mix_kd"] == pytest.approx(parts["kd"], rel=1e-5)
    assert parts["mix_ce"] == pytest.approx(parts["ce"], rel=1e-5)
    _, kd_parts = make_objective(DistillConfig(method="kd", temperature=2.0)).loss(student, teacher, batch, None)
    assert kd_parts["kd"] == pytest.approx(parts["kd"], rel=1e-6)
    assert kd_parts["ce"] == pytest.approx(parts["ce"], rel=1e-6)


def test_total_is_the_weighted_sum():
    student, teacher = TinyMixable(seed=1), TinyMixable(seed=2)
    w = LossWeights(ce=0.5, kd=2.0, mix_kd=0.0, mix_ce=3.0)
    total, parts = make_objective(DistillConfig(method="mixkd", weights=w)).loss(
        student, teacher, toy_batch(), torch.Generator().manual_seed(0))
    assert total.item() == pytest.approx(0.5 * parts["ce"] + 2 * parts["kd"] + 3 * parts["mix_ce"], rel=1e-5)


def test_student_on_mixed_input_sees_mixed_embeddings():
    model = TinyMixable()
    batch = toy_batch()
    mix = Mix(torch.tensor([1, 2, 3, 0]), torch.tensor([0.3, 0.6, 0.9, 0.1]))
    both = model(batch, mix)
    assert both.shape == (8, 3)
    assert torch.allclose(both[:4], model(batch))
    emb = mix_tensor(model.embed(batch)["words"], mix)
    assert torch.allclose(both[4:], model.classify({"words": emb}, mixed_batch(batch, mix)), atol=1e-6)
    assert torch.allclose(model(batch, mix, originals=False), both[4:], atol=1e-6)


@pytest.mark.parametrize("field, kwargs, words", [
    ("alpha", {"alpha": 0.0}, "alpha: must be > 0"),
    ("alpha", {"alpha": -1.0}, "alpha: must be > 0"),
    ("temperature", {"temperature": 0.0}, "temperature: must be > 0"),
    ("method", {"method": "distill"}, "method: 'distill' is not one of"),
    ("weights", {"weights": LossWeights(ce=-1.0)}, "weights.ce: must be"),
    ("weights", {"method": "kd", "weights": LossWeights(ce=0.0, kd=0.0)}, "weights: every loss"),
    ("epochs", {"epochs": 0}, "epochs: must be >= 1"),
    ("batch_size", {"batch_size": 1}, "batch_size: must be >= 2"),
    ("lr", {"lr": 0.0}, "lr: must be > 0"),
])
def test_config_refuses_bad_values_naming_the_field(field, kwargs, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        DistillConfig(**kwargs).validate()


def test_sample_mix_refuses_nonpositive_alpha():
    with pytest.raises(ConfigError, match="alpha"):
        sample_mix(4, 0.0, torch.Generator())


def test_empty_dataset_is_refused():
    with pytest.raises(EmptyDatasetError, match="empty"):
        DictDataset({"input_ids": torch.zeros(0, 4, dtype=torch.long), "labels": torch.zeros(0, dtype=torch.long)})


def _toy_data(n=96, seed=0):
    """Label = whether token 1 appears more often than token 2: learnable from embeddings."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 6, (n, 6), generator=g)
    labels = ((ids == 1).sum(1) > (ids == 2).sum(1)).long()
    return DictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                       padded=("input_ids", "attention_mask"), mask="attention_mask")


@pytest.mark.parametrize("method", ["none", "kd", "mixkd"])
def test_every_method_trains_a_student(method):
    data = _toy_data()
    teacher = TinyMixable(vocab=6, classes=2, seed=3)
    fit(teacher, data, make_objective(DistillConfig(method="none", epochs=15, lr=0.05, batch_size=16, device="cpu")),
        progress=False)
    student = TinyMixable(vocab=6, dim=4, classes=2, seed=4)
    history = fit(student, data, make_objective(DistillConfig(method=method, epochs=15, lr=0.05, batch_size=16,
                                                              device="cpu")),
                  teacher=teacher, eval_data=data, progress=False)
    assert len(history.epochs) == 15 and history.samples_per_s > 0
    assert history.epochs[-1].loss < history.epochs[0].loss
    assert evaluate(student, data)["accuracy"] > 0.8
    expected = {"none": {"ce"}, "kd": {"ce", "kd"}, "mixkd": {"ce", "kd", "mix_kd", "mix_ce"}}[method]
    assert set(history.epochs[-1].parts) == expected


def test_kd_without_teacher_is_refused():
    with pytest.raises(ValueError, match="needs a teacher"):
        fit(TinyMixable(), _toy_data(), make_objective(DistillConfig(method="kd", device="cpu")), progress=False)
