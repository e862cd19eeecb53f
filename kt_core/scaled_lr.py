"""A parameter that carries its own learning-rate multiplier (kt_core.train.param_groups reads it).

WAFFLe's dictionary and its private variational parameters (kt_core.factorized) need steps of
other sizes than the rest of the model; a mark on the parameter itself travels with any parameter
list an optimizer is built from (the DP engine splits the model's parameters over two).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class ScaledLRParameter(nn.Parameter):
    """A parameter that asks for `lr_scale` times the optimizer's learning rate (`sgd_lr_scale`
    under SGD, when it differs: see FactorizedLinear.SGD_PRIVATE_LR_FACTOR).

    `kt_core.train.make_optimizer_for` puts it in a parameter group of its own, so the multiplier
    holds under Adam (which normalizes any gradient multiplier away) as under SGD, and wherever a
    plain parameter list is handed to the optimizer (the DP engine's private / public split). The
    subclass, not an attribute, carries the mark so that copy.deepcopy keeps it.
    """

    def __new__(cls, data: Tensor, lr_scale: float = 1.0, requires_grad: bool = True,
                sgd_lr_scale: float | None = None):
        p = super().__new__(cls, data, requires_grad)
        p.lr_scale = float(lr_scale)
        p.sgd_lr_scale = float(lr_scale if sgd_lr_scale is None else sgd_lr_scale)
        return p

    def scale_for(self, optimizer: str) -> float:
        return self.sgd_lr_scale if optimizer == "sgd" else self.lr_scale

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        out = type(self)(self.data.clone(memory_format=torch.preserve_format), self.lr_scale,
                         self.requires_grad, self.sgd_lr_scale)
        memo[id(self)] = out
        return out

    def __repr__(self) -> str:
        return f"ScaledLRParameter(lr_scale={self.lr_scale}, sgd_lr_scale={self.sgd_lr_scale}) containing:\n{self.data!r}"
