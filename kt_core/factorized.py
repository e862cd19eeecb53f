"""Adapters that replace a linear layer `in_features -> out_features`, behind one interface.

  waffle    W_i = W0 + W_a diag(r * b_i) W_b   (WAFFLe, Hao et al. IEEE Access 2022)
  lora      W   = W0 + (alpha / rank) B A       (A and B both shared: averaging them is inexact)
  ffa_lora  W   = W0 + (alpha / rank) B A       (A frozen, only B shared: averaging is exact)
  dense     W                                    (plain FedAvg baseline)

Each adapter says which of its tensors are shared, private or frozen (`tensor_roles`) and returns
its KL term (`kl_divergence`, zero unless Bayesian). Every random initial value comes from the
layer's own seed, never from the global RNG, so frozen tensors are identical at every site without
being transferred.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_core.manifest import Role

EULER_GAMMA = 0.5772156649015329


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _randn(shape, std: float, gen: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=gen) * std


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

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# ---------------------------------------------------------------------------------------------
# WAFFLe: Indian Buffet Process factor selection
# ---------------------------------------------------------------------------------------------

def kumaraswamy_beta_kl(a: Tensor, b: Tensor, alpha: float | Tensor) -> Tensor:
    """KL(Kumaraswamy(a, b) || Beta(alpha, 1)), elementwise, in closed form.

    Nalisnick & Smyth (2017) give the general Beta(alpha, beta) case with an infinite Taylor sum
    weighted by (beta - 1); with beta = 1 that sum vanishes, so this is exact, not a truncation.
    Evaluated in float64 because the terms cancel to near zero close to the prior.
    """
    a, b = a.double(), b.double()
    alpha = torch.as_tensor(alpha, dtype=torch.float64, device=a.device)
    log_beta_fn = torch.lgamma(alpha) - torch.lgamma(alpha + 1.0)   # log B(alpha, 1) = -log alpha
    kl = ((a - alpha) / a * (-EULER_GAMMA - torch.digamma(b) - 1.0 / b)
          + torch.log(a * b) + log_beta_fn - (b - 1.0) / b)
    # exact KL is >= 0; round-off near the minimum must not make the ELBO reward anything
    return kl.clamp_min(0.0)


def bernoulli_kl(logits: Tensor, log_prior: Tensor) -> Tensor:
    """KL(Bernoulli(sigmoid(logits)) || Bernoulli(exp(log_prior))), elementwise.

    The prior is given in log space because pi_k is a product of stick-breaking fractions and is
    tiny for late factors.
    """
    logits, log_prior = logits.double(), log_prior.double()
    q = torch.sigmoid(logits)
    log_q, log_not_q = F.logsigmoid(logits), F.logsigmoid(-logits)
    log_not_prior = torch.log1p(-torch.exp(log_prior))
    kl = q * (log_q - log_prior) + (1.0 - q) * (log_not_q - log_not_prior)
    return kl.clamp_min(0.0)


def _factor_stds(in_features: int, out_features: int) -> tuple[float, float]:
    """Init stds of (w_a, w_b): every column of W_a and row of W_b has unit expected norm.

    Under SGD a product of factors moves W at a rate set by the factors' norms: the step W gets
    through w_b is scaled by |r a_k|^2, through w_a by |r b_k|^2, through r by |a_k|^2 |b_k|^2. Unit
    norms (with r = 1) keep all three near a dense layer's, so the same learning rate is safe.
    The price is a smaller initial W (variance K / (out * in) rather than He's 2 / in), which
    training recovers from quickly; the He-scaled alternative diverged on Fashion-MNIST at the
    default lr 0.05 with momentum.
    """
    return 1.0 / math.sqrt(out_features), 1.0 / math.sqrt(in_features)


class FactorizedLinear(Adapter):
    """WAFFLe layer: W_i = W0 + W_a diag(r * b_i) W_b with K factors.

    Shared (aggregated by the coordinator): the dictionary w_a (out x K), w_b (K x in), the factor
    strengths r (K) and the bias. Private (never leaves the site): the site's variational posterior
    over which factors it uses: gate_logits for the relaxed-Bernoulli q(b_k), and kuma_log_a,
    kuma_log_b for the Kumaraswamy q(v_k) of the IBP stick-breaking prior v_k ~ Beta(alpha, 1),
    pi_k = prod_{j<=k} v_j. Frozen: w0, only when a base weight is given (no base means W0 = 0).
    """

    # clamp u away from 0 and 1 so log(u), log(1-u) and u^(1/b) stay finite
    _EPS = 1e-6
    # pi_k is clamped into [_PI_MIN, 1 - _PI_MIN] inside the Bernoulli KL
    _PI_MIN = 1e-6

    # Initial gate logit: a number for every factor, or "prior" (logit of the IBP prior's E[pi_k]).
    # The gates learn only through the straight-through relaxed sample, whose expected slope
    # sigmoid'(z) / temperature, z = (logit + logistic noise) / temperature, is 0.17 at logit 1 but
    # 0.06 at logit 3 (the earlier default), and a logit must travel its own size to flip a gate.
    # Started at 3 the gates moved ~0.06 in 30 rounds of the WAFFLe benchmark and every site kept
    # every factor; at 1 (q = 0.73: most factors on while the dictionary trains) each site settles
    # on its own subset within ~10 rounds. 0 personalizes as well but makes local training noisier
    # (and the eval mode, logit > 0, starts with every gate off); "prior" switches most late
    # factors off before the dictionary has trained them (22% on, little difference between sites).
    GATE_INIT: float | str = 1.0
    # Gradient multiplier of the gate logits: a per-parameter learning-rate multiplier that leaves
    # the optimizer alone (see _logits). A gate's gradient is a sum over the batch of one hidden unit
    # of the K-dim bottleneck, comparable to r's, while a logit must travel O(1..5) to flip; at the
    # shared learning rate (0.05, clipped to total norm 1) it moves ~1e-3 per step. 10..100 all
    # personalized in the benchmark without NaN at lr 0.05 + momentum 0.9 (30 is the middle).
    GATE_LR_SCALE: float = 30.0

    def __init__(self, in_features: int, out_features: int, *, n_factors: int = 16,
                 ibp_alpha: float = 4.0, temperature: float = 0.67, gate_init: float | str | None = None,
                 gate_lr_scale: float | None = None,
                 base: Tensor | None = None, base_bias: Tensor | None = None, seed: int = 0):
        super().__init__()
        if n_factors < 1 or ibp_alpha <= 0 or temperature <= 0:
            raise ValueError("n_factors must be >= 1, ibp_alpha and temperature > 0")
        self.in_features, self.out_features, self.n_factors = in_features, out_features, n_factors
        self.ibp_alpha, self.temperature = float(ibp_alpha), float(temperature)
        gen = _generator(seed)
        w0 = _check_base(base, in_features, out_features)
        # on top of a pretrained W0 the delta starts at zero (W_a = 0, as LoRA zeroes B), so
        # adaptation starts from the backbone's own function
        std_a, std_b = _factor_stds(in_features, out_features)
        w_b = _randn((n_factors, in_features), std_b, gen)
        w_a = _randn((out_features, n_factors), std_a, gen)
        if w0 is not None:
            w_a.zero_()
            self.register_buffer("w0", w0)
        else:
            self.w0 = None
        self.w_a = nn.Parameter(w_a)
        self.w_b = nn.Parameter(w_b)
        self.r = nn.Parameter(torch.ones(n_factors))
        self.bias = nn.Parameter(_initial_bias(base_bias, out_features))
        # gates start undecided (see GATE_INIT); q(v) starts at the prior Beta(alpha, 1) =
        # Kumaraswamy(alpha, 1)
        gate_init = self.GATE_INIT if gate_init is None else gate_init
        self.gate_lr_scale = float(self.GATE_LR_SCALE if gate_lr_scale is None else gate_lr_scale)
        if gate_init == "prior":
            k = torch.arange(1, n_factors + 1, dtype=torch.float64)
            pi = (self.ibp_alpha / (self.ibp_alpha + 1.0)) ** k
            init = torch.logit(pi).float()
        else:
            init = torch.full((n_factors,), float(gate_init))
        self.gate_logits = nn.Parameter(init)
        self.kuma_log_a = nn.Parameter(torch.full((n_factors,), math.log(self.ibp_alpha)))
        self.kuma_log_b = nn.Parameter(torch.zeros(n_factors))

    def tensor_roles(self) -> dict[str, Role]:
        roles = {"w_a": Role.SHARED, "w_b": Role.SHARED, "r": Role.SHARED, "bias": Role.SHARED,
                 "gate_logits": Role.PRIVATE, "kuma_log_a": Role.PRIVATE, "kuma_log_b": Role.PRIVATE}
        if self.w0 is not None:
            roles["w0"] = Role.FROZEN
        return roles

    def _logits(self) -> Tensor:
        """gate_logits with their gradient multiplied by gate_lr_scale; the forward value is exactly
        gate_logits (d + s * 0). Under SGD this is a learning-rate multiplier s for the gates only;
        like a parametrization logit = s * theta it also makes their gradient count s times more in
        a global grad-norm clip."""
        g = self.gate_logits
        if self.gate_lr_scale == 1.0:
            return g
        d = g.detach()
        return d + self.gate_lr_scale * (g - d)

    def gates(self) -> Tensor:
        """b for this forward pass: a hard 0/1 vector in both modes.

        Training draws from the binary Concrete and uses the straight-through estimator (forward
        hard, backward relaxed), so the network trained on is the network evaluated. Eval takes the
        posterior mode.
        """
        if not self.training:
            return (self.gate_logits > 0).to(self.gate_logits.dtype)
        u = torch.rand_like(self.gate_logits).clamp(self._EPS, 1 - self._EPS)
        soft = torch.sigmoid((self._logits() + torch.log(u) - torch.log1p(-u)) / self.temperature)
        hard = (soft > 0.5).to(soft.dtype)
        # bracketed so the forward value is exactly 0/1: (hard + soft) - soft rounds
        return hard + (soft - soft.detach())

    def effective_weight(self, gates: Tensor | None = None) -> Tensor:
        b = self.gates() if gates is None else gates
        delta = (self.w_a * (self.r * b)) @ self.w_b
        return delta if self.w0 is None else self.w0 + delta

    def forward(self, x: Tensor) -> Tensor:
        # through the K-dim bottleneck rather than materializing W: K(in + out) per row, not in*out
        h = F.linear(x, self.w_b) * (self.r * self.gates())
        out = F.linear(h, self.w_a, self.bias)
        return out if self.w0 is None else out + F.linear(x, self.w0)

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
        a, b = self.kuma_log_a.exp(), self.kuma_log_b.exp()
        kl_v = kumaraswamy_beta_kl(a, b, self.ibp_alpha).sum()
        kl_b = bernoulli_kl(self._logits(), self.log_prior_pi()).sum()
        return (kl_v + kl_b).to(self.w_a.dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_factors={self.n_factors}, ibp_alpha={self.ibp_alpha}, "
                f"temperature={self.temperature}, base={self.w0 is not None}")


# ---------------------------------------------------------------------------------------------
# LoRA and FFA-LoRA
# ---------------------------------------------------------------------------------------------

def _seeded_base(in_features: int, out_features: int, gen: torch.Generator) -> Tensor:
    # He-normal: a frozen random ReLU layer keeps its input's scale, so the low-rank update has
    # useful random features to build on
    return _randn((out_features, in_features), math.sqrt(2.0 / in_features), gen)


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


def aggregate_factors(updates: list[tuple[dict[str, Tensor], float]]) -> dict[str, Tensor]:
    """Sample-weighted mean of same-named tensors: what the coordinator does to shared factors."""
    if not updates:
        raise ValueError("aggregate_factors: no updates")
    names = set(updates[0][0])
    total = 0.0
    for i, (state, weight) in enumerate(updates):
        if set(state) != names:
            raise ValueError(f"update {i} has tensors {sorted(set(state) ^ names)} that update 0 "
                             f"does not share")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"update {i}: weight must be finite and >= 0, got {weight}")
        total += weight
    if total <= 0:
        raise ValueError("aggregate_factors: weights sum to zero")
    out = {}
    for name in sorted(names):
        ref = updates[0][0][name]
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for i, (state, weight) in enumerate(updates):
            t = state[name]
            if t.shape != ref.shape:
                raise ValueError(f"tensor {name!r}: update {i} has shape {tuple(t.shape)}, "
                                 f"update 0 has {tuple(ref.shape)}")
            acc += t.detach().cpu().double() * weight
        out[name] = (acc / total).to(ref.dtype)
    return out
