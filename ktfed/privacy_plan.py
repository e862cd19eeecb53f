"""`ktfed privacy plan`: the noise multiplier a budget needs, and a quick accuracy-cost estimate.

The noise multiplier is exact (the accountant's search, security.dp.noise_multiplier_for). The
accuracy cost is an *estimate by proxy*: a small MLP (64-64-10) is trained on a stratified sample
of scikit-learn's digits of the same size N (capped at the 1,797 digits there are), with the same
batch, the same number of steps and the same sampling rate, once with plain SGD and once with
DP-SGD at that noise multiplier (clip 1.0), and evaluated on the held-out digits. The difference
says how much the noise hurts a task of this size; it is not a prediction for the site's own
model and data, whose sensitivity to noise can be larger or smaller. Seconds on a CPU.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from security.dp import AccountingError, noise_multiplier_for
from security.dp.engine import DPSettings, plan_round, train_dp


class PlanError(ValueError):
    pass


def _proxy_accuracy(n: int, batch: int, steps: int, sigma: float | None, seed: int = 0) -> float:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    n = min(n, 1400)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, train_size=n, test_size=min(397, len(y) - n),
                                              stratify=y, random_state=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5 if sigma else 0.2, momentum=0.9 if not sigma else 0.0)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    b = min(batch, n)
    if sigma is None:
        g = torch.Generator().manual_seed(seed)
        done = 0
        while done < steps:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, b):
                if done >= steps:
                    break
                idx = perm[i:i + b]
                opt.zero_grad()
                F.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
                done += 1
    else:
        per_epoch = plan_round(n, b, 1).steps
        train_dp(model, xt, yt, loss_fn=F.cross_entropy, optimizer=opt,
                 settings=DPSettings(noise_multiplier=sigma, max_grad_norm=1.0, batch_size=b,
                                     epochs=math.ceil(steps / per_epoch), max_steps=steps))
    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())


def plan(*, samples: int, batch: int, rounds: int, epochs: int, epsilon: float, delta: float | None = None,
         accountant: str = "prv", estimate: bool = True) -> dict:
    if samples < 2 or batch < 1 or rounds < 1 or epochs < 1:
        raise PlanError("samples must be >= 2; batch, rounds and epochs >= 1")
    if batch > samples:
        raise PlanError(f"batch {batch} is larger than the {samples} samples")
    delta = delta if delta is not None else 1.0 / (10 * samples)
    if not 0 < delta < 1.0 / samples:
        raise PlanError(f"delta {delta:g} must be in (0, 1/N = {1 / samples:.3g})")
    rp = plan_round(samples, batch, epochs)
    steps = rp.steps * rounds
    try:
        sigma = noise_multiplier_for(epsilon, delta, rp.sample_rate, steps, accountant)
    except AccountingError as err:
        raise PlanError(str(err)) from None
    result = {"samples": samples, "batch": batch, "rounds": rounds, "epochs": epochs, "epsilon": epsilon,
              "delta": delta, "accountant": accountant, "sample_rate": rp.sample_rate, "steps_per_round": rp.steps,
              "total_steps": steps, "noise_multiplier": sigma,
              "noise_std_on_mean_gradient": sigma / (samples * rp.sample_rate)}
    text = [f"N={samples}, batch {batch} (q={rp.sample_rate:.4g}), {rounds} round(s) x {epochs} epoch(s) = "
            f"{steps} DP-SGD steps, epsilon {epsilon:g} at delta {delta:.3g} ({accountant}):",
            f"  noise multiplier  {sigma:.4f}   (noise std on the mean clipped gradient: "
            f"{result['noise_std_on_mean_gradient']:.4f} x clip norm per step)"]
    if estimate:
        proxy_steps = min(steps, 3000)
        plain = _proxy_accuracy(samples, batch, proxy_steps, None)
        private = _proxy_accuracy(samples, batch, proxy_steps, sigma)
        result.update(proxy_accuracy_plain=plain, proxy_accuracy_dp=private, proxy_accuracy_cost=plain - private,
                      proxy_steps=proxy_steps)
        text.append(f"  accuracy cost     ~{100 * (plain - private):.1f} points "
                    f"(proxy: 64-64-10 MLP on {min(samples, 1400)} digits, {proxy_steps} steps: "
                    f"{plain:.3f} plain vs {private:.3f} DP-SGD; an estimate, not a prediction for your model)")
    result["text"] = "\n".join(text)
    return result
