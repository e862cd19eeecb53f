"""DP-SGD at a site: per-sample gradient rules, the models it trains, membership inference, bad input."""
from __future__ import annotations

import dataclasses
import re

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from torch import nn

import participant.privacy  # noqa: F401  registers the adapters' per-sample gradient rules
from coordinator import messages
from coordinator.errors import Refusal
from kt_core.config import ConfigError, load_toml
from kt_core.config_file import RunUnworkable
from kt_core.factorized import ADAPTERS
from kt_core.models import ModelConfig, build_model, kl_divergence
from kt_core.wire import convert
from kt_core.wire import federation_pb2 as pb
from participant.trainer import BudgetExceeded, LocalTrainer
from security.dp import PrivacyLedger, RoundSpend
from security.dp.engine import DPSettings, DPUnsupportedError, check_model, train_dp
from security.dp.ledger import LEDGER_FILE
from tests.conftest import fast_config
from tests.test_rounds import _next_assignment, coordinator  # noqa: F401  (fixture)


# -- per-sample gradient rules ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["waffle", "lora", "ffa_lora", "dense"])
def test_hooks_rules_equal_per_sample_autograd(mode):
    from opacus.grad_sample import GradSampleModule
    from security.dp import grad_samplers

    torch.manual_seed(0)
    layer = ADAPTERS[mode](6, 5, seed=1, **({"n_factors": 4} if mode == "waffle" else {}))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, target = torch.randn(7, 6), torch.randn(7, 5)
    for name, p in layer.named_parameters():
        if "kuma" in name:   # only in the KL term: train_dp keeps them out of the hooks the same way
            p.requires_grad_(False)
    undo = grad_samplers.instrument(layer)
    gsm = GradSampleModule(layer, strict=False, loss_reduction="sum")
    layer.train()
    ((gsm(x) - target) ** 2).sum().backward()
    gates = layer._dp_gates[0] if mode == "waffle" else None
    got = {n: p.grad_sample.clone() for n, p in layer.named_parameters() if getattr(p, "grad_sample", None) is not None}
    gsm._close()
    undo()
    if mode == "waffle":  # the same gates, per sample, by plain autograd
        layer.gates = lambda: gates + (torch.sigmoid(layer.gate_logits / layer.temperature)
                                       - torch.sigmoid(layer.gate_logits / layer.temperature).detach())
        probe = layer.gates()
        (jac,) = torch.autograd.grad(probe, layer.gate_logits, torch.ones_like(probe))
    for i in range(7):
        layer.zero_grad()
        ((layer(x[i:i + 1]) - target[i:i + 1]) ** 2).sum().backward()
        for name, p in layer.named_parameters():
            if name in got and name != "gate_logits":
                torch.testing.assert_close(got[name][i], p.grad, rtol=1e-4, atol=1e-5, msg=f"{mode} {name}")
    if mode == "waffle":
        assert set(got) == {"w_a", "w_b", "r", "bias", "gate_logits"}
        layer.__dict__.pop("gates")


def test_waffle_and_dense_train_under_dp_and_kl_params_move_outside_the_mechanism():
    d = load_digits()
    x, y = torch.tensor(d.data[:300] / 16, dtype=torch.float32), torch.tensor(d.target[:300])
    for mode in ("waffle", "dense"):
        model = build_model(ModelConfig(adapter=mode, input_dim=64, hidden=(32,), n_factors=4))
        public = [p for n, p in model.named_parameters() if "kuma" in n]
        before = [p.detach().clone() for p in public]
        private = [p for n, p in model.named_parameters() if "kuma" not in n]
        result = train_dp(model, x, y, loss_fn=F.cross_entropy, optimizer=torch.optim.SGD(private, lr=0.1),
                          settings=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=32, epochs=1,
                                              max_physical_batch_size=16),
                          public_loss=lambda: kl_divergence(model) / 300, public_params=public,
                          public_optimizer=torch.optim.SGD(public, lr=0.1) if public else None)
        assert result.steps == 10 and np.isfinite(result.loss)
        assert all(not torch.equal(a, b) for a, b in zip(before, public))       # KL gradient applied
        assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for p in model.parameters())


def test_unsupported_layers_are_named():
    with pytest.raises(DPUnsupportedError, match="BatchNorm"):
        check_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), "hooks")
    waffle = build_model(ModelConfig(adapter="waffle", input_dim=8, hidden=(4,), n_factors=2))
    with pytest.raises(DPUnsupportedError, match="random gates.*use 'hooks'"):
        check_model(waffle, "functorch")


# -- membership inference -------------------------------------------------------------------------

M, EPOCHS = 80, 100


def _mia_auc(dp: bool, seed: int) -> float:
    """Loss-threshold membership inference (Yeom et al. 2018) on an overfit site."""
    d = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(d.target))[:2 * M]
    x = torch.tensor(d.data[idx] / 16, dtype=torch.float32)
    y = torch.tensor(d.target[idx])
    # a few noisy labels make memorization visible in the loss (a realistic overfit site)
    flip = torch.from_numpy(rng.random(2 * M) < 0.2)
    y = torch.where(flip, torch.from_numpy(rng.integers(0, 10, 2 * M)), y)
    members = slice(0, M)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    if dp:
        train_dp(model, x[members], y[members], loss_fn=F.cross_entropy,
                 optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                 settings=DPSettings(noise_multiplier=2.0, max_grad_norm=1.0, batch_size=20, epochs=EPOCHS), seed=seed)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(EPOCHS * M // 20):
            perm = torch.randperm(M)[:20]
            opt.zero_grad()
            F.cross_entropy(model(x[members][perm]), y[members][perm]).backward()
            opt.step()
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y, reduction="none").numpy()
    labels = np.r_[np.ones(M), np.zeros(M)]
    return float(roc_auc_score(labels, -loss))   # low loss -> "member"


def test_dp_lowers_membership_inference_auc_on_an_overfit_site():
    # DP-SGD's noise comes from OS entropy (never from a seed), so its AUC varies from run to run
    # (0.60-0.73 seen at noise multiplier 2); the mean over three data seeds is stable.
    plain, private = [], []
    for seed in (0, 1, 2):
        plain.append(_mia_auc(False, seed))
        private.append(_mia_auc(True, seed))
        print(f"seed {seed}: membership-inference AUC without DP {plain[-1]:.3f}, with DP-SGD {private[-1]:.3f}")
        assert plain[-1] > 0.75                 # the overfit site leaks
        assert private[-1] < plain[-1]
    assert np.mean(private) < np.mean(plain) - 0.1   # DP-SGD clearly lowers it


# -- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,message", [
    ("target_epsilon = 0.0", "privacy.target_epsilon: must be a finite number > 0"),
    ("target_epsilon = -1.0", "privacy.target_epsilon: must be a finite number > 0"),
    ("target_epsilon = 1.0\nmax_grad_norm = -1.0", "privacy.max_grad_norm: must be a finite number > 0"),
    ("target_epsilon = 1.0\ndelta = 1.0", "privacy.delta: must be in (0, 1)"),
    ("target_epsilon = 1.0\npoisson_sampling = false", "privacy.poisson_sampling: false voids"),
    ("target_epsilon = 1.0\nnoise_multiplier = 1.0", "privacy.target_epsilon: give exactly one"),
    ("noise_multiplier = 1.0", "privacy.epsilon_budget: required"),
    ("target_epsilon = 1.0\ngrad_sample_mode = \"ghost\"", "privacy.grad_sample_mode:"),
    ("target_epsilon = 1.0\nbudget = 3.0", "privacy.budget: unknown field"),
    ("target_epsilon = 1.0\n[privacy.site_budgets]\nsite-a = 0.0", "privacy.site_budgets.site-a: must be"),
])
def test_invalid_privacy_fields_are_named(fields, message):
    with pytest.raises(ConfigError) as err:
        load_toml(f"[privacy]\nenabled = true\n{fields}\n", "run.toml")
    assert str(err.value).startswith("run.toml: ") and message in str(err.value)


def test_acknowledged_non_poisson_sampling_is_accepted():
    cfg = load_toml("[privacy]\nenabled = true\ntarget_epsilon = 1.0\npoisson_sampling = false\n"
                    "acknowledge_unaccounted_sampling = true\n")
    assert cfg.privacy.poisson_sampling is False


def _dp_config(extra: str):
    return load_toml(fast_config(sites=["site-a", "site-b"], extra="[privacy]\nenabled = true\n" + extra)).resolved()


def test_delta_not_below_one_over_n_is_refused_at_the_site(tmp_path):
    with pytest.raises(RunUnworkable, match=r"privacy.delta: 0.01 is not below 1/N = 1/\d+ for site-a's") as err:
        LocalTrainer("site-a", "run-1", _dp_config("noise_multiplier = 1.0\nepsilon_budget = 5.0\ndelta = 0.01"),
                     tmp_path)
    # what the coordinator is told names the setting, not the site's record count
    assert err.value.public == "privacy.delta: 0.01 is not below 1/N for this site's training records"


def test_a_target_epsilon_no_noise_reaches_is_refused_without_the_sites_sample_rate(tmp_path):
    with pytest.raises(RunUnworkable, match=r"privacy.target_epsilon: no noise multiplier .* sample rate 0\.\d+") as err:
        LocalTrainer("site-a", "run-1", _dp_config("target_epsilon = 0.001\ndelta = 1e-5"), tmp_path)
    assert err.value.public.startswith("privacy.target_epsilon: no noise multiplier reaches epsilon 0.001 at delta "
                                       "1e-05 over the run's")
    rate, steps = re.search(r"sample rate ([\d.]+) over (\d+) steps", str(err.value)).groups()
    assert rate not in err.value.public and f"{steps} steps" not in err.value.public, err.value.public


def test_budget_already_spent_at_start_declines_and_the_stricter_budget_wins(tmp_path, caplog):
    config = _dp_config("noise_multiplier = 1.0\nepsilon_budget = 5.0\ndelta = 1e-5")
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE, "site-a")
    ledger.reserve(run_id="old", round_no=1, attempt_id="x", spend=RoundSpend(0.5, 0.5, 50), max_grad_norm=1.0,
                   delta=1e-5, budget=1e9)
    ledger.close()
    trainer = LocalTrainer("site-a", "run-1", config, tmp_path, epsilon_budget=2.0)
    assert trainer.privacy.budget == 2.0                       # the site's own, stricter budget
    assert "privacy budget already spent" in caplog.text
    with pytest.raises(BudgetExceeded, match="past this site's budget 2"):
        trainer.train(1, 32, 0.05, 0, 1, round_no=1, attempt_id="t")
    assert len(trainer.ledger.entries()) == 1                  # nothing trained, nothing recorded


@pytest.fixture
def three_sites(tmp_path):
    """Three sites, two required: one site's decline leaves the attempt open (with two sites it
    would close at once, since the round could no longer complete)."""
    from tests.test_rounds import running_coordinator, stop_coordinator

    coord = running_coordinator(tmp_path, sites=("s1", "s2", "s3"))
    yield coord
    stop_coordinator(coord)


def test_decline_for_another_round_or_task_is_refused_like_uploads(three_sites):
    coordinator = three_sites
    engine = coordinator.current()
    sessions = [engine.sessions.connect(s) for s in ("s1", "s2", "s3")]
    task = _next_assignment(sessions[0])
    for session in sessions[1:]:
        _next_assignment(session)

    def decline(round_no=task.header.round, attempt_id=task.attempt_id, site_id="s1"):
        request = pb.DeclineRequest(header=convert.header(engine.run_id, round_no, site_id), attempt_id=attempt_id,
                                    code="budget_exhausted", reason="r", epsilon_spent=1.0, epsilon_budget=1.0,
                                    epsilon_would_be=2.0)
        return engine.answers.decline(site_id, messages.decline_answer(request))

    for kwargs, code in (({"round_no": task.header.round + 1}, grpc.StatusCode.FAILED_PRECONDITION),
                         ({"round_no": 0}, grpc.StatusCode.FAILED_PRECONDITION),
                         ({"attempt_id": b"\x00" * 16}, grpc.StatusCode.FAILED_PRECONDITION),
                         ({"site_id": "s4"}, grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(Refusal) as err:
            decline(**kwargs)
        assert err.value.code == code
    attempt = decline()
    assert "s1" in attempt.declined and "s1" not in attempt.awaiting()
    with pytest.raises(Refusal) as err:
        decline()
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    status = engine.status()
    info = {p.site_id: p for p in status.sites}
    assert info["s1"].privacy_status == "budget_exhausted" and info["s1"].epsilon_budget == 1.0
    assert coordinator.store.declines(engine.run_id)[0]["site_id"] == "s1"


# -- user level ---------------------------------------------------------------------------------------

def test_user_level_clipping_and_noise_shares():
    from security.dp.user_level import central_noise_std, clip_update, distributed_share_std, update_norm

    update = {"a": np.full((3, 4), 2.0, np.float32), "b": np.ones(5, np.float32)}
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(np.sqrt(12 * 4 + 5)) and update_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert clipped["a"].dtype == np.float32
    # any t shares of std z S / sqrt(t) sum to the central mechanism's noise z S
    assert distributed_share_std(1.2, 0.5, 4) ** 2 * 4 == pytest.approx((1.2 * 0.5) ** 2)
    assert central_noise_std(1.2, 0.5, 4) == pytest.approx(1.2 * 0.5 / 4)


def test_privacy_cli_ledger_and_plan(tmp_path, capsys):
    from ktfed.cli import main

    ledger = PrivacyLedger(tmp_path / LEDGER_FILE, "site-a")
    ledger.reserve(run_id="run-1", round_no=1, attempt_id="t", spend=RoundSpend(0.1, 1.0, 10), max_grad_norm=1.0,
                   delta=1e-5, budget=5.0)
    ledger.close()
    assert main(["privacy", "ledger", "--site", "site-a", "--state", str(tmp_path), "--json"]) == 0
    import json
    data = json.loads(capsys.readouterr().out)
    assert data["entries"][0]["noise_multiplier"] == 1.0 and data["entries"][0]["accountant"] == "prv"
    assert main(["privacy", "ledger", "--site", "site-a", "--state", str(tmp_path / "none")]) == 2
    assert main(["privacy", "plan", "--samples", "400", "--batch", "40", "--rounds", "2", "--epsilon", "3",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["noise_multiplier"] > 0 and 0 <= plan["proxy_accuracy_plain"] <= 1


def test_central_dp_fedavg_adds_noise_with_equal_weights_and_records_user_level_epsilon(tmp_path):
    from coordinator.coordinator import Coordinator
    from coordinator.store import Store
    from tests.test_rounds import _upload

    text = fast_config(rounds=1, min_sites=2, timeout=30, sites=["s1", "s2"],
                       extra="[privacy]\nenabled = true\nmechanism = \"central\"\nupdate_clip_norm = 1.0\n"
                             "user_noise_multiplier = 1.0\n")
    config = load_toml(text)
    config = dataclasses.replace(config, federation=dataclasses.replace(config.federation, gather_timeout_s=0.0))
    coord = Coordinator(Store(tmp_path))
    coord.start_run(config)
    try:
        engine = coord.current()
        before = {n: a.copy() for n, a in engine.global_state.items()}
        s1, s2 = engine.sessions.connect("s1"), engine.sessions.connect("s2")
        t1, t2 = _next_assignment(s1), _next_assignment(s2)
        _upload(engine, "s1", t1, 0.0, 10)
        _upload(engine, "s2", t2, 0.0, 1000)
        import time
        deadline = time.monotonic() + 20
        while engine.rounds_completed < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = coord.store.privacy_rounds(engine.run_id)
        assert len(rows) == 1 and rows[0]["noise_std"] == pytest.approx(1.0 * 1.0 / 2)
        assert rows[0]["epsilon_prv"] > 0
        # both updates were zero: what moved the state is the noise, std z S / n
        moved = np.concatenate([(engine.global_state[n] - before[n]).ravel() for n in before])
        assert 0.3 < moved.std() < 0.7
        (params,) = coord.store.db.execute("SELECT params_json FROM privacy_params").fetchone()
        assert '"mechanism": "central"' in params
    finally:
        coord.stop("shutdown")
        coord.store.close()
