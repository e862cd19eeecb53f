"""Adapters that replace a linear layer `in_features -> out_features`, behind one interface.

  waffle    W_i = W0 + W_a diag(r * b_i) W_b   (WAFFLe, Hao et al. IEEE Access 2022)
  lora      W   = W0 + (alpha / rank) B A       (A and B both shared: averaging them is inexact)
  ffa_lora  W   = W0 + (alpha / rank) B A       (A frozen, only B shared: averaging is exact)
  dense     W                                    (plain FedAvg baseline)

Each adapter says which of its tensors are shared, private or frozen (`tensor_roles`) and returns
its KL term (`kl_divergence`, zero unless Bayesian).

What makes WAFFLe learn as fast as a dense layer and personalize, each with its measurements where
it is defined: the seeded frozen base (`FactorizedLinear`, "Why a seeded base"), the variational
parameters' own learning rate (`ScaledLRParameter`, `FactorizedLinear.GATE_LR_SCALE`), the
dictionary's learning-rate multiplier (`DICT_LR_SCALE`), the gates' natural gradient
(`FactorizedLinear._natural_logits`), where the gates start (`GATE_INIT`), the temperature (the
temperature note), the per-site KL weighting (class docstring), the prior's concentration
(`IBP_ALPHA_PER_FACTOR`), the evaluation mode that keeps a layer alive (`mode_gates`), the output
layer's private bias (class docstring, `PRIVATE_BIAS_LR_SCALE`) and, outside this file, the
optimizer state a site keeps from round to round (kt_core/site_optimizer.py).
Unless said otherwise the figures are mean local test accuracy after aggregation on digits, 10
sites, 30 rounds of 1 local epoch, MLP 64-256-128-10, partition seed 1 (a validation seed;
bench/waffle_grid.py reports other seeds), grad-norm clip 1. Those for the gates, the temperature
and the prior were taken with K = 16 factors learned from scratch (no base), those for the gates
and the temperature also before DICT_LR_SCALE existed (dictionary at x1); the seeded base and K = 5
came afterwards, validated as a whole with those choices kept.

Every random initial value comes from the layer's own seed, never from the global RNG, so frozen
tensors are identical at every site without being transferred.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_core.factorized_kl import bernoulli_kl, concrete_gates, grouped_kl, kumaraswamy_beta_kl
from kt_core.manifest import Role
from kt_core.scaled_lr import ScaledLRParameter

def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _randn(shape, std: float, gen: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=gen) * std


def _multiplier(name: str, value) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_base(base: Tensor | None, in_features: int, out_features: int) -> Tensor | None:
    if base is None:
        return None
    if tuple(base.shape) != (out_features, in_features):
        raise ValueError(f"base weight has shape {tuple(base.shape)}, "
                         f"expected ({out_features}, {in_features})")
    return base.detach().to(torch.float32).clone()


def _initial_bias(base_bias: Tensor | None, out_features: int) -> Tensor:
    if base_bias is None:
        return torch.zeros(out_features)
    if tuple(base_bias.shape) != (out_features,):
        raise ValueError(f"base bias has shape {tuple(base_bias.shape)}, expected ({out_features},)")
    return base_bias.detach().to(torch.float32).clone()


def _seeded_base(in_features: int, out_features: int, gen: torch.Generator) -> Tensor:
    # He-normal, a dense ReLU layer's init: a frozen random layer keeps its input's scale, so a
    # low-rank update has useful random features to build on. Drawn first from the layer's seed,
    # so without a base WAFFLe, LoRA and dense start from the same layer at the same seed.
    return _randn((out_features, in_features), math.sqrt(2.0 / in_features), gen)


class Adapter(nn.Module):
    """The interface every adapter implements."""

    in_features: int
    out_features: int

    def tensor_roles(self) -> dict[str, Role]:
        raise NotImplementedError

    def effective_weight(self) -> Tensor:
        raise NotImplementedError

    def kl_divergence(self) -> Tensor:
        return torch.zeros((), device=self.bias.device)

    def kl_problem(self) -> tuple | None:
        """None, or the layer's KL as a kt_core.factorized_kl.grouped_kl problem (solved with its kind's)."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# ---------------------------------------------------------------------------------------------
# WAFFLe: Indian Buffet Process factor selection
# ---------------------------------------------------------------------------------------------

class FactorizedLinear(Adapter):
    """WAFFLe layer: W_i = W0 + W_a diag(r * b_i) W_b with K factors.

    Shared (aggregated by the coordinator): the dictionary w_a (out x K), w_b (K x in), the factor
    strengths r (K) and the bias. Private (never leaves the site): the site's variational posterior
    over which factors it uses: gate_logits for the relaxed-Bernoulli q(b_k), and kuma_log_a,
    kuma_log_b for the Kumaraswamy q(v_k) of the IBP stick-breaking prior v_k ~ Beta(alpha, 1),
    pi_k = prod_{j<=k} v_j. Frozen: w0, the pretrained base weight or, without one, a He-normal
    layer drawn from the layer's seed (identical at every site, never transferred).

    Why a seeded base. The bytes a site sends per layer and round are K (in + out) + K + out, so
    the factors exist to be few. Learned from scratch (W0 = 0, as before) the product was the whole
    layer, of rank K: K = 16 on the digits MLP 64-256-128-10 sent only 3.7x fewer bytes than dense,
    and at K = 5 (11x) the network could not fit the data (validation mean 0.77; K = 4: 0.71, K = 8:
    0.95; dense FedAvg 0.95). On a frozen random layer, as LoRA and FFA-LoRA here build, the random
    features carry the function from the first step and the K shared directions carry what the
    federation learns; W_a starts at zero, so the layer starts as the dense baseline's initial
    layer at the same seed. Partition seeds 1-2, shards2 / Dirichlet 0.1, 0.5, 1.0 / quantity x SGD
    / Adam, 30 rounds, mean of those 20 cells, K = 5 on the seeded base vs K = 16 from scratch:
    digits 10 sites 0.972 vs 0.972 (FedAvg 0.951, local-only 0.960), 5 sites 0.969 vs 0.971,
    50 sites 0.903 vs 0.898 (FedAvg 0.893, local-only 0.858); Fashion-MNIST 10 sites 0.851 vs 0.852
    (FedAvg 0.774, local-only 0.847). W_b is drawn N(0, 1/in) (rows of unit expected norm) on
    either base, as LoRA draws A.

    The KL term is the layer's whole KL(q || prior); `kt_core.train.elbo_loss` divides it by the
    site's own sample count N_i, so each site optimizes its own per-sample ELBO: a site with little
    data stays near the prior, one with much data selects what its
    data supports. Where the prior leaves a data-poor site is what IBP_ALPHA_PER_FACTOR decides.

    Why a private output bias (`private_bias`, the image MLP's output layer:
    ModelConfig.private_output_bias). Under label skew what differs most between sites is their
    label prior p_i(y). A shared output bias is the federation's average prior, so every site's
    model predicts the federation's label mix, and a selection of K factors cannot undo that; a
    bias kept at the site holds log p_i(y) - log p(y), what logit adjustment adds to a classifier
    trained under another prior, and is what a data-poor site needs most. It also keeps home the
    most direct label leak of an update: the output bias's gradient names the batch's labels (the
    observation behind iDLG). It costs `out` floats fewer per round. Validation seeds 1-2, digits
    and Fashion-MNIST, 10 and 50 sites, the 7 partitions of bench/waffle_grid.py, SGD and Adam
    (112 federations), WAFFLe's mean local accuracy / cells meeting the grid's three criteria of
    28 per data set: shared bias 0.928 / 4 (digits), 0.831 / 3 (Fashion); private bias at
    PRIVATE_BIAS_LR_SCALE 30: 0.962 / 16, 0.885 / 16. The whole output layer private (as the
    navigation task's private_head) scored 0.931 / 8 and 0.867 / 11, and under Adam its gates
    stopped moving.
    """

    # clamp u away from 0 and 1 so log(u), log(1-u) and u^(1/b) stay finite
    _EPS = 1e-6
    # pi_k is clamped into [_PI_MIN, 1 - _PI_MIN] inside the Bernoulli KL
    _PI_MIN = 1e-6

    # The IBP concentration alpha when none is given: this times K. alpha sets where a site with
    # little data ends, since its per-site ELBO (KL / N_i) leaves it near the prior: the truncated
    # stick-breaking prior keeps E[pi_k] = (alpha / (alpha + 1))^k on, 3.5 of 16 factors at the old
    # alpha = 4. Those first few factors alone are a sub-network that the larger sites (12-16 of 16
    # on) never trained as such, so under quantity skew the smallest sites scored 0 (digits, 20
    # sites, worst site 0.00 / 0.13 SGD / Adam). With alpha tied to K the prior keeps most of the
    # shared network (pi_16 = 0.61 at alpha = 2K) and a site switches factors off only where its data
    # pays for it. Validation seeds 1-3, digits, 10 sites (quantity also 20), WAFFLe mean over the
    # 12 cells of shards2 / dir0.1 / dir0.5 / dir1.0 / quantity x SGD / Adam (worst site under
    # quantity skew, 20 sites, SGD / Adam): alpha 4: 0.884 (0.00 / 0.13), 8: 0.918 (0.27 / 0.47),
    # 16: 0.936 (0.52 / 0.36), 32: 0.946 (0.77 / 0.74), 64: 0.941 (0.77 / 0.77); dense FedAvg 0.920.
    # Gates on fall from 39-91% to 84-100%; the skewed partitions still personalize (2-class shards
    # swap gain, see bench/README.md). A larger K at alpha 4 made it worse (K = 32: 0.890), and
    # K = 32 at alpha 16 was as good (0.944) at twice the bytes. Nothing in it is private or shared.
    IBP_ALPHA_PER_FACTOR: float = 2.0
    # Initial gate logit: a number for every factor, or "prior" (logit of the IBP prior's E[pi_k]).
    # At 3 (q = 0.95) nearly every factor is in the network trained on while the dictionary forms;
    # the gates then leave where a site's data or the prior says so. Lower starts drop factors at
    # random every step, and the network evaluated (the posterior mode: all on) is not the one
    # trained: 0.88 vs 0.94 at 2 (2-class shards, SGD 0.05), and 0.58 at 1 (the earlier default,
    # measured before the natural gradient). "prior" switches most late factors off before the
    # dictionary has trained them.
    GATE_INIT: float | str = 3.0
    # Learning-rate multiplier of the private variational parameters (gate logits, Kumaraswamy
    # parameters), applied by the optimizer's parameter group for ScaledLRParameter, so it holds
    # under Adam (the old gradient multiplier was normalized away there) and does not crowd the
    # dictionary out of a global grad-norm clip. A logit must travel O(1..5) to flip a gate while
    # the dictionary's entries move O(0.01). On 2-class shards: under SGD 0.05, 30 -> 0.89 (gates
    # 91% on, Hamming 0.14), 100 -> 0.93 (71%, 0.34), 300 -> 0.91 (62%, 0.36); under Adam 3e-3,
    # 30 -> 0.92 (72%, 0.35), 100 -> 0.91-0.94 (50%, 0.36-0.38), 1000 -> 0.76 (32%).
    GATE_LR_SCALE: float = 100.0
    # Learning-rate multiplier of the dictionary (w_a, w_b) on the seeded base (1 on a pretrained
    # one: there the navigation recipe's step size was validated). A step on a product of factors
    # moves W along K directions only, and W_a starting at zero gives W_b no gradient on the first
    # step, so at the recipe's learning rate the update forms slowly; FedAvg of factors also loses
    # part of each round's progress (mean(A) mean(B) != mean(AB)). On the seeded base, K = 5, the
    # 20 validation cells of the class docstring, digits 10 sites: x1 0.875, x4 0.949, x8 0.972,
    # x16 0.963. (From scratch at K = 16 the best was x4; there the factors started at He's scale.)
    # Adam normalizes gradient scale but not a parameter group's learning rate, so one multiplier
    # serves both optimizers; a smaller one for Adam alone (its 10 cells, seeds 1-2, x2 / x4 / x8)
    # scored 0.853 / 0.917 / 0.952 on digits and 0.838 / 0.840 / 0.838 on Fashion-MNIST. Where a
    # site takes many steps a round, and under DP-SGD, where it scales the noise too, 8 overshoots:
    # the image demo's recipe takes 4 (`ModelConfig.dict_lr_scale`, ktfed/launcher.py MODEL_IMAGE).
    DICT_LR_SCALE: float = 8.0
    # Learning-rate multiplier of a private output bias (`private_bias`). Trained by one site and
    # never averaged, it must travel a log-prior ratio, O(1..5), in the steps a small site takes
    # (one a round at 50 sites): at the recipe's Adam lr it moved 0.003 a step. Validation means
    # of "Why a private output bias" at x1 / x10 / x30 / x100: digits 0.938 / 0.959 / 0.962 /
    # 0.955, Fashion-MNIST 0.851 / 0.881 / 0.885 / 0.881; at x100 Adam's gates stopped moving
    # (Hamming 0.00 at 10 sites: the bias carried all the personalization), at x30 0.03-0.27.
    PRIVATE_BIAS_LR_SCALE: float = 30.0
    # Under SGD the private multipliers (GATE_LR_SCALE or the layer's gate_lr_scale, and
    # PRIVATE_BIAS_LR_SCALE) are taken times this. Adam's step is bounded by its learning rate, so
    # a private parameter travels O(1..5) only at a large multiplier; SGD's step grows with the
    # gradient (a bias's is p - y, O(0.1..1)) and momentum 0.9 adds up ten of them, so at Adam's
    # multipliers a site's private parameters followed its minibatches' noise: where nothing in
    # its data asks for personalization (quantity skew) its gates switched factors off and its
    # bias drifted. Validation seeds 1-2, the 7 partitions of bench/waffle_grid.py, 10 and 50
    # sites (28 SGD runs a data set), WAFFLe mean / worst site / std over sites, x1 -> x0.1:
    # digits 0.957 / 0.702 / 0.075 -> 0.974 / 0.815 / 0.046 (quantity skew 0.912 -> 0.962),
    # Fashion-MNIST 0.883 / 0.733 / 0.051 -> 0.892 / 0.778 / 0.044 (0.762 -> 0.788); better in 42
    # of 56 runs. The selection then carries less: gates on 0.87-0.93 -> 0.97-0.98, Hamming
    # 0.12-0.21 -> 0.03-0.06, swap gain +0.005-0.017 -> +0.003-0.005. Under Adam the same x0.1
    # lost (digits 0.964 -> 0.893, Fashion-MNIST 0.889 -> 0.752; 2-class shards 0.97 -> 0.78).
    SGD_PRIVATE_LR_FACTOR: float = 0.1
    # the gates' natural-gradient multiplier 1 / (q (1 - q)) is capped at 1 / FISHER_FLOOR (20):
    # 0.05 and 0.01 gave the same means, 0.05 a better worst site (0.83 vs 0.73, 2-class shards)
    FISHER_FLOOR: float = 0.05
    # The temperature of the binary Concrete (the constructor's `temperature`, 0.67): the forward
    # pass is hard (straight-through), so it only shapes the gates' gradient; 0.4, 0.67 and 1.0
    # gave 0.92 / 0.93 / 0.95 on 2-class shards and 0.82 / 0.82 / 0.79 on Dirichlet(0.1), within
    # seed noise, so there is no annealing schedule: nothing measured asked for one, and a
    # schedule would tie a layer to a round counter.

    def __init__(self, in_features: int, out_features: int, *, n_factors: int = 16,
                 ibp_alpha: float | None = None, temperature: float = 0.67, gate_init: float | str | None = None,
                 gate_lr_scale: float | None = None, dict_lr_scale: float | None = None,
                 private_bias: bool = False, base: Tensor | None = None, base_bias: Tensor | None = None,
                 seed: int = 0):
        super().__init__()
        ibp_alpha = self.IBP_ALPHA_PER_FACTOR * n_factors if ibp_alpha is None else ibp_alpha
        if n_factors < 1 or ibp_alpha <= 0 or temperature <= 0:
            raise ValueError("n_factors must be >= 1, ibp_alpha and temperature > 0")
        self.in_features, self.out_features, self.n_factors = in_features, out_features, n_factors
        self.ibp_alpha, self.temperature = float(ibp_alpha), float(temperature)
        gen = _generator(seed)
        w0 = _check_base(base, in_features, out_features)
        self.seeded_base = w0 is None
        if self.seeded_base:
            w0 = _seeded_base(in_features, out_features, gen)
        self.register_buffer("w0", w0)
        w_b = _randn((n_factors, in_features), 1.0 / math.sqrt(in_features), gen)
        default_dict = self.DICT_LR_SCALE if self.seeded_base else 1.0
        dict_scale = _multiplier("dict_lr_scale", default_dict if dict_lr_scale is None else dict_lr_scale)
        # the update starts at zero: the layer starts as its base
        self.w_a = ScaledLRParameter(torch.zeros(out_features, n_factors), dict_scale)
        self.w_b = ScaledLRParameter(w_b, dict_scale)
        self.r = nn.Parameter(torch.ones(n_factors))
        bias = _initial_bias(base_bias, out_features)
        self.private_bias = bool(private_bias)
        sgd = self.SGD_PRIVATE_LR_FACTOR
        self.bias = (ScaledLRParameter(bias, self.PRIVATE_BIAS_LR_SCALE, sgd_lr_scale=self.PRIVATE_BIAS_LR_SCALE * sgd)
                     if self.private_bias else nn.Parameter(bias))
        gate_init = self.GATE_INIT if gate_init is None else gate_init
        gate_lr_scale = self.GATE_LR_SCALE if gate_lr_scale is None else gate_lr_scale
        self.gate_lr_scale = _multiplier("gate_lr_scale", gate_lr_scale)
        if gate_init == "prior":
            k = torch.arange(1, n_factors + 1, dtype=torch.float64)
            pi = (self.ibp_alpha / (self.ibp_alpha + 1.0)) ** k
            init = torch.logit(pi).float()
        else:
            init = torch.full((n_factors,), float(gate_init))
        # q(v) starts at the prior Beta(alpha, 1) = Kumaraswamy(alpha, 1)
        gate_sgd = self.gate_lr_scale * sgd
        self.gate_logits = ScaledLRParameter(init, self.gate_lr_scale, sgd_lr_scale=gate_sgd)
        self.kuma_log_a = ScaledLRParameter(torch.full((n_factors,), math.log(self.ibp_alpha)),
                                            self.gate_lr_scale, sgd_lr_scale=gate_sgd)
        self.kuma_log_b = ScaledLRParameter(torch.zeros(n_factors), self.gate_lr_scale, sgd_lr_scale=gate_sgd)

    def _apply(self, fn, *args, **kwargs):
        # a conversion that replaces Parameter objects (e.g. to another tensor type) would drop the
        # ScaledLRParameter mark and with it the learning-rate multiplier: put it back
        before = {name: self._parameters[name]
                  for name in ("w_a", "w_b", "bias", "gate_logits", "kuma_log_a", "kuma_log_b")}
        out = super()._apply(fn, *args, **kwargs)
        for name, old in before.items():
            p = self._parameters[name]
            if isinstance(old, ScaledLRParameter) and not isinstance(p, ScaledLRParameter):
                self._parameters[name] = ScaledLRParameter(p.data, old.lr_scale, p.requires_grad, old.sgd_lr_scale)
        return out

    def tensor_roles(self) -> dict[str, Role]:
        return {"w_a": Role.SHARED, "w_b": Role.SHARED, "r": Role.SHARED,
                "bias": Role.PRIVATE if self.private_bias else Role.SHARED, "gate_logits": Role.PRIVATE,
                "kuma_log_a": Role.PRIVATE, "kuma_log_b": Role.PRIVATE,
                "w0": Role.FROZEN}

    def _natural_logits(self) -> Tensor:
        """gate_logits, with their gradient divided by the Bernoulli's Fisher information q(1 - q)
        (floored at FISHER_FLOOR); the forward value is exactly gate_logits (d + m * 0).

        The gradient of the expected loss with respect to a logit carries the factor q(1 - q): at
        logit 3 (q = 0.95) it is 0.045, so under plain SGD a confident gate hardly moves whatever
        the data says (on digits, 10 sites, 30 rounds at lr 0.05 every gate stayed on, Hamming 0,
        at any multiplier up to 100; 3000 diverged). Dividing by it is the natural gradient of a
        Bernoulli in logit space: the step then follows the change in q that the data asks for.
        Adam divides by its own running scale, so there this mostly cancels; under SGD it is what
        lets the gates learn (0.61 -> 0.94 mean local accuracy, 2-class shards, gates 70% on,
        Hamming 0.34).
        """
        g = self.gate_logits
        d = g.detach()
        q = torch.sigmoid(d)
        return d + (g - d) / (q * (1 - q)).clamp_min(self.FISHER_FLOOR)

    def mode_gates(self) -> Tensor:
        """The posterior mode of q(b): factor k on where its logit is > 0, but never no factor at all.

        A layer with every gate off outputs its bias alone, whatever the input: the whole network
        then predicts one class. Under the per-site ELBO a site with a few dozen samples can reach
        that state (the IBP prior pays for switching late factors off, and the data term is too
        small to object), and it did: sites scored 0.0 on Dirichlet(0.1) splits of digits. So the
        most probable factor stays on when the rule would switch them all off.
        """
        logits = self.gate_logits.detach()
        on = logits > 0
        if not bool(on.any()):
            on = logits == logits.max()
        return on.to(logits.dtype)

    def gates(self) -> Tensor:
        """b for this forward pass: a hard 0/1 vector in both modes.

        Training draws from the binary Concrete and uses the straight-through estimator (forward
        hard, backward relaxed), so the network trained on is the network evaluated. Eval takes the
        posterior mode (`mode_gates`).
        """
        if not self.training:
            return self.mode_gates()
        u = torch.rand_like(self.gate_logits).clamp(self._EPS, 1 - self._EPS)
        # sigmoid((_natural_logits() + log u - log(1 - u)) / temperature), hard forward, relaxed
        # backward, in one autograd node (tests/test_waffle_kl.py holds the composition it equals)
        return concrete_gates(self.gate_logits, u, self.temperature, self.FISHER_FLOOR)

    def effective_weight(self, gates: Tensor | None = None) -> Tensor:
        b = self.gates() if gates is None else gates
        return self.w0 + (self.w_a * (self.r * b)) @ self.w_b

    def forward(self, x: Tensor) -> Tensor:
        # through the K-dim bottleneck rather than materializing W: K(in + out) per row, not in*out
        h = F.linear(x, self.w_b) * (self.r * self.gates())
        return F.linear(h, self.w_a, self.bias) + F.linear(x, self.w0)

    def log_prior_pi(self) -> Tensor:
        """log pi_k = sum_{j<=k} log v_j with v ~ q(v): a reparameterized sample in training, the
        posterior mean in eval (the v_j are independent under q, so prod E[v_j] = E[pi_k])."""
        a, b = self.kuma_log_a.exp().double(), self.kuma_log_b.exp().double()
        if self.training:
            u = torch.rand_like(a).clamp(self._EPS, 1 - self._EPS)
            # v = (1 - u^(1/b))^(1/a), in log space
            log_v = torch.log1p(-torch.exp(torch.log(u) / b).clamp(max=1 - self._EPS)) / a
        else:
            # E[v] = b B(1 + 1/a, b) for Kumaraswamy(a, b)
            log_v = (torch.log(b) + torch.lgamma(1 + 1 / a) + torch.lgamma(b)
                     - torch.lgamma(1 + 1 / a + b))
        return torch.cumsum(log_v, 0).clamp(math.log(self._PI_MIN), math.log1p(-self._PI_MIN))

    def kl_divergence(self) -> Tensor:
        """KL(q || prior) of this layer: `kl_divergence_reference`'s value and gradient, from
        kt_core.factorized_kl's closed form (one autograd node instead of ~60: 4x faster)."""
        return grouped_kl([self.kl_problem()])[0]

    def kl_problem(self) -> tuple:
        # the same draw as the reference's (float64, one per factor); none in eval
        u = (torch.rand_like(self.kuma_log_a, dtype=torch.float64).clamp(self._EPS, 1 - self._EPS)
             if self.training else None)
        key = (self.n_factors, self.ibp_alpha, self.FISHER_FLOOR, self._PI_MIN, self._EPS, self.w_a.dtype,
               self.gate_logits.device, self.training)
        return key, self.gate_logits, self.kuma_log_a, self.kuma_log_b, u

    def kl_divergence_reference(self) -> Tensor:
        """The KL as a composition that autograd differentiates (what `kl_divergence` must equal)."""
        a, b = self.kuma_log_a.exp(), self.kuma_log_b.exp()
        kl_v = kumaraswamy_beta_kl(a, b, self.ibp_alpha).sum()
        kl_b = bernoulli_kl(self._natural_logits(), self.log_prior_pi()).sum()
        return (kl_v + kl_b).to(self.w_a.dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_factors={self.n_factors}, ibp_alpha={self.ibp_alpha}, "
                f"temperature={self.temperature}, seeded_base={self.seeded_base}, private_bias={self.private_bias}")


# ---------------------------------------------------------------------------------------------
# LoRA and FFA-LoRA
# ---------------------------------------------------------------------------------------------

class LoRALinear(Adapter):
    """W = W0 + (alpha / rank) B A. A, B and bias shared; W0 frozen (seeded random if no base).

    Averaging A and B separately is not averaging B A (mean(B) mean(A) != mean(B A)): the known
    inexactness of federated LoRA that FFA-LoRA removes.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int = 8, alpha: float = 16.0,
                 base: Tensor | None = None, base_bias: Tensor | None = None, seed: int = 0):
        super().__init__()
        if rank < 1 or alpha <= 0:
            raise ValueError("rank must be >= 1 and alpha > 0")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scaling = float(alpha) / rank
        gen = _generator(seed)
        w0 = _check_base(base, in_features, out_features)
        # drawn even when a base is given, so A is the same function of the seed either way
        seeded = _seeded_base(in_features, out_features, gen)
        self.register_buffer("w0", seeded if w0 is None else w0)
        # Kaiming-uniform(a=sqrt(5)), as in the LoRA reference code
        bound = 1.0 / math.sqrt(in_features)
        self.lora_a = nn.Parameter(torch.empty(rank, in_features).uniform_(-bound, bound, generator=gen))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))   # delta starts at 0
        self.bias = nn.Parameter(_initial_bias(base_bias, out_features))

    def tensor_roles(self) -> dict[str, Role]:
        return {"lora_a": Role.SHARED, "lora_b": Role.SHARED, "bias": Role.SHARED, "w0": Role.FROZEN}

    def delta(self) -> Tensor:
        return self.scaling * self.lora_b @ self.lora_a

    def effective_weight(self) -> Tensor:
        return self.w0 + self.delta()

    def forward(self, x: Tensor) -> Tensor:
        low_rank = F.linear(F.linear(x, self.lora_a), self.lora_b)
        return F.linear(x, self.w0, self.bias) + self.scaling * low_rank

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling}"


class FFALoRALinear(LoRALinear):
    """FFA-LoRA (Sun et al. 2024): A frozen at its seeded init, only B and bias shared.

    The delta is linear in B, so the mean of the sites' B gives exactly the mean of their deltas.
    """

    def __init__(self, in_features: int, out_features: int, **kw):
        super().__init__(in_features, out_features, **kw)
        lora_a = self.lora_a.detach().clone()
        del self.lora_a
        self.register_buffer("lora_a", lora_a)

    def tensor_roles(self) -> dict[str, Role]:
        return {"lora_a": Role.FROZEN, "lora_b": Role.SHARED, "bias": Role.SHARED, "w0": Role.FROZEN}


# ---------------------------------------------------------------------------------------------
# Dense baseline
# ---------------------------------------------------------------------------------------------

class DenseLinear(Adapter):
    """Plain linear layer, everything shared: the FedAvg baseline."""

    def __init__(self, in_features: int, out_features: int, *, base: Tensor | None = None,
                 base_bias: Tensor | None = None, seed: int = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        w0 = _check_base(base, in_features, out_features)
        weight = _seeded_base(in_features, out_features, _generator(seed)) if w0 is None else w0
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(_initial_bias(base_bias, out_features))

    def tensor_roles(self) -> dict[str, Role]:
        return {"weight": Role.SHARED, "bias": Role.SHARED}

    def effective_weight(self) -> Tensor:
        return self.weight


ADAPTERS: dict[str, type[Adapter]] = {
    "waffle": FactorizedLinear,
    "lora": LoRALinear,
    "ffa_lora": FFALoRALinear,
    "dense": DenseLinear,
}

