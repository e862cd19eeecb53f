"""The local training recipe."""
import copy

import numpy as np
import pytest
import torch

from kt_core.data import PartitionSpec, load_dataset, site_split
from kt_core.models import ModelConfig, build_model, kl_divergence, private_state, shared_state
from kt_core.train import (TrainConfig, TrainResult, _grad_clipper, _with_proximal_term, elbo_loss, evaluate,
                            make_optimizer, param_groups, train_local, with_kl)



@pytest.fixture(scope="module")
def shard():
    """One of three sites' digits, mildly non-IID."""
    ds = load_dataset("digits")
    return site_split(ds, ["a", "b", "c"], "a", PartitionSpec("dirichlet", alpha=1.0, seed=0))


def digits_model(adapter="waffle", seed=0):
    return build_model(ModelConfig(adapter=adapter, input_dim=64, hidden=(64,), n_factors=16, seed=seed))


def test_waffle_learns_a_digits_shard(shard):
    tx, ty, vx, vy = shard
    model = digits_model()
    before = evaluate(model, vx, vy)["accuracy"]
    result = train_local(model, tx, ty, TrainConfig(epochs=5, batch_size=32, lr=0.01, optimizer="adam"))
    after = evaluate(model, vx, vy)
    assert isinstance(result, TrainResult)
    assert result.num_samples == len(ty) and result.steps == 5 * -(-len(ty) // 32)
    assert np.isfinite(result.loss) and result.seconds > 0
    assert before < 0.4 and after["accuracy"] > 0.8          # chance is 0.1


@pytest.mark.parametrize("adapter", ["waffle", "lora", "ffa_lora", "dense"])
def test_each_adapter_mode_trains_with_sgd(shard, adapter):
    tx, ty, vx, vy = shard
    model = digits_model(adapter)
    before = evaluate(model, tx, ty)["loss"]
    train_local(model, tx, ty, TrainConfig(epochs=4, batch_size=32, lr=0.05))
    after = evaluate(model, vx, vy)
    # FFA-LoRA from scratch (random frozen W0 and A, only B learns) is the weakest: ~0.7 here
    assert evaluate(model, tx, ty)["loss"] < 0.7 * before
    assert after["accuracy"] > 0.5


def test_waffle_with_sgd_at_the_default_rate_does_not_diverge_on_784_dim_inputs():
    # a product of factors at an unbalanced init blows up under momentum SGD at lr 0.05
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(512, 784, generator=gen)
    y = (x[:, :392].sum(1) > x[:, 392:].sum(1)).long()
    model = build_model(ModelConfig(adapter="waffle", n_factors=16))
    result = train_local(model, x, y, TrainConfig(epochs=2))
    assert np.isfinite(result.loss)


def test_max_grad_norm_bounds_each_step(shard):
    tx, ty, _, _ = shard
    model = digits_model("dense")
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train_local(model, tx, ty, TrainConfig(max_steps=1, lr=1.0, momentum=0.0, max_grad_norm=1e-3))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < (after - before).norm() <= 1e-3 * 1.001


def test_training_is_deterministic_given_the_seed(shard):
    tx, ty, _, _ = shard

    def run(seed):
        model = digits_model()
        result = train_local(model, tx, ty, TrainConfig(epochs=1, seed=seed, max_steps=6))
        return result, shared_state(model), private_state(model)

    (r1, s1, p1), (r2, s2, p2), (r3, s3, _) = run(0), run(0), run(1)
    assert r1.loss == r2.loss
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)


def test_training_leaves_the_global_rng_alone(shard):
    tx, ty, _, _ = shard
    state = torch.get_rng_state()
    train_local(digits_model(), tx, ty, TrainConfig(max_steps=2))
    assert torch.equal(torch.get_rng_state(), state)


def test_max_steps_progress_and_mode_restored(shard):
    tx, ty, _, _ = shard
    model = digits_model().eval()
    seen = []
    result = train_local(model, tx, ty, TrainConfig(epochs=3, max_steps=5),
                         progress=lambda step, loss: seen.append((step, loss)))
    assert result.steps == 5 and [s for s, _ in seen] == [1, 2, 3, 4, 5]
    assert result.loss == pytest.approx(np.mean([l for _, l in seen]))
    assert not model.training


def test_frozen_tensors_do_not_move(shard):
    tx, ty, _, _ = shard
    model = digits_model("ffa_lora")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("w0", "lora_a"))}
    train_local(model, tx, ty, TrainConfig(max_steps=5))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())


def test_fedprox_term_pulls_shared_tensors_towards_the_round_start_and_leaves_private_ones(shard):
    tx, ty, _, _ = shard

    def moved(mu):
        model = digits_model("waffle")
        # past the first steps: at init w_a = 0 (the layer is its seeded base), so the gates' data
        # gradient, which goes through w_a, is still zero and they would hardly move at all
        train_local(model, tx, ty, TrainConfig(max_steps=8, lr=0.05))
        start_shared, start_private = shared_state(model), private_state(model)
        train_local(model, tx, ty, TrainConfig(max_steps=8, lr=0.05, prox_mu=mu))
        dist = lambda a, b: sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5  # noqa: E731
        return dist(shared_state(model), start_shared), dist(private_state(model), start_private)

    free_shared, free_private = moved(0.0)
    prox_shared, prox_private = moved(50.0)
    assert prox_shared < 0.5 * free_shared
    # the private selection is not pulled: it moves about as far either way
    assert prox_private > 0.5 * free_private


def test_fedprox_node_equals_the_squared_distance_it_replaced():
    model = digits_model("waffle")
    shared = set(shared_state(model))
    anchors = {n: p.detach().clone() for n, p in model.named_parameters() if n in shared}
    loss = _with_proximal_term(model, lambda idx: torch.zeros(()), 3.0)   # anchored as training starts
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pulled = [p for n, p in model.named_parameters() if n in shared]
    fast = loss(torch.arange(1))
    fast_grads = torch.autograd.grad(fast, pulled)
    ref = 0.5 * 3.0 * sum(((p - anchors[n]) ** 2).sum() for n, p in model.named_parameters() if n in shared)
    ref_grads = torch.autograd.grad(ref, pulled)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5) and fast.item() > 0
    for got, want in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    private = [p for n, p in model.named_parameters() if n not in shared]
    assert private and all(g is None for g in torch.autograd.grad(loss(torch.arange(1)), private, allow_unused=True))


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_grad_clipper_is_torchs_clip_grad_norm(max_norm):
    a, b = digits_model("waffle"), digits_model("waffle")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        pa.grad = torch.randn_like(pa)
        pb.grad = pa.grad.clone()
    a.layers[0].r.grad = b.layers[0].r.grad = None     # a parameter without a gradient is left out
    torch.nn.utils.clip_grad_norm_(a.parameters(), max_norm)
    _grad_clipper(list(b.parameters()), max_norm)()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert (pa.grad is None and pb.grad is None) or torch.equal(pa.grad, pb.grad)
    _grad_clipper(list(b.parameters()), None)()        # off: a no-op


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_cpu_optimizers_are_fused_and_step_as_the_foreach_ones_do(opt):
    model = digits_model("waffle")
    twin = copy.deepcopy(model)
    cfg = TrainConfig(optimizer=opt, lr=0.01)
    fused = make_optimizer(model, cfg)
    kind = torch.optim.Adam if opt == "adam" else torch.optim.SGD
    extra = {} if opt == "adam" else {"momentum": cfg.momentum}
    ref = kind(param_groups(list(twin.parameters()), cfg.lr, opt), lr=cfg.lr, foreach=True, **extra)
    # one group per learning rate: the plain one, the dictionary's, the gates' and the private output bias's
    assert all(g["fused"] for g in fused.param_groups) and len(fused.param_groups) == 4
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_model_without_bayesian_adapters_adds_no_kl_term():
    loss = torch.tensor(1.5, requires_grad=True)
    assert with_kl(digits_model("dense"), loss, 10, 1.0) is loss
    assert with_kl(digits_model("waffle"), loss, 10, 1.0).item() > 1.5


def test_elbo_loss_adds_the_kl_per_sample():
    model = digits_model().eval()
    x, y = torch.rand(8, 64), torch.randint(0, 10, (8,))
    logits = model(x)
    ce = elbo_loss(model, logits, y, num_samples=100, kl_weight=0.0)
    full = elbo_loss(model, logits, y, num_samples=100, kl_weight=2.0)
    assert full.item() == pytest.approx(ce.item() + 2.0 * kl_divergence(model).item() / 100, rel=1e-5)


def test_non_finite_loss_stops_training():
    model = digits_model("dense")
    x = torch.full((16, 64), float("nan"))
    with pytest.raises(FloatingPointError, match="step 0"):
        train_local(model, x, torch.zeros(16, dtype=torch.long), TrainConfig())


def test_evaluate_is_deterministic_and_restores_mode(shard):
    _, _, vx, vy = shard
    model = digits_model().train()
    a, b = evaluate(model, vx, vy, batch_size=7), evaluate(model, vx, vy)
    assert a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert 0.0 <= a["accuracy"] <= 1.0 and model.training


def test_bad_inputs():
    model = digits_model("dense")
    with pytest.raises(ValueError, match="no samples"):
        train_local(model, np.zeros((0, 64)), np.zeros(0), TrainConfig())
    with pytest.raises(ValueError, match="length N"):
        evaluate(model, np.zeros((3, 64)), np.zeros(2))


@pytest.mark.parametrize("field,value", [
    ("epochs", 0), ("batch_size", 0), ("batch_size", 1.5), ("lr", 0.0), ("lr", float("nan")),
    ("optimizer", "rmsprop"), ("momentum", 1.0), ("momentum", -0.1), ("kl_weight", -1.0),
    ("max_steps", 0), ("seed", -1), ("max_grad_norm", 0.0), ("prox_mu", -0.1), ("prox_mu", float("inf")),
])
def test_train_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize("field, value", [("epochs", 1001), ("batch_size", 1 << 17), ("max_steps", 10**8),
                                          ("epochs", 0), ("epochs", True)])
def test_train_settings_a_coordinator_sends_are_bounded(field, value):
    with pytest.raises(ValueError, match=f"{field}: must be an integer between 1 and"):
        TrainConfig(**{field: value}).validate()
    TrainConfig(epochs=10**6, max_steps=30).validate()   # max_steps bounds the work instead
