"""An MLP on a site's own CSV table: the federation's task, installed at every site and the coordinator.

The run config names it as `tabular_csv.task:TabularMLP` and pins its version; each site points
its participant at its own table (`--site-data site-a.toml`, see make_data.py for the files).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from kt_core.site_data import SiteDataset
from kt_core.task_api import FederatedTask, LocalData


@dataclass(frozen=True)
class Options:
    n_features: int = 30                # the model's input width: every site's table has these columns
    n_classes: int = 2
    hidden: tuple[int, ...] = (32,)

    def validate(self) -> None:
        if self.n_features < 1 or self.n_classes < 2:
            raise ValueError("n_features: needs at least one feature and two classes")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError("hidden: a non-empty list of positive layer widths")


class MLP(nn.Module):
    def __init__(self, n_features: int, hidden: tuple[int, ...], n_classes: int):
        super().__init__()
        widths = [n_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.layers = nn.Sequential(*layers, nn.Linear(widths[-1], n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TabularMLP(FederatedTask):
    name = "tabular-mlp"
    version = "1.0.0"
    Options = Options
    metrics = ("accuracy", "loss")
    targets = ("layers.*",)             # every Linear of the MLP carries an adapter

    def build_model(self) -> nn.Module:
        return MLP(self.options.n_features, self.options.hidden, self.options.n_classes)

    def load_data(self, data: SiteDataset) -> LocalData:
        o = self.options
        if data.features is None or data.features.shape[1] != o.n_features:
            width = None if data.features is None else data.features.shape[1]
            raise ValueError(f"features: the model takes {o.n_features} feature columns, {data.path} has {width}")
        if len(data.label_names) != o.n_classes:
            raise ValueError(f"labels: the model has {o.n_classes} classes, {data.path} declares {list(data.label_names)}")
        x, y = data.features, data.labels
        train, test = data.train_indices, data.test_indices
        # standardized with this site's own training statistics: columns on very different scales
        # (areas in the hundreds, smoothness near 0.1) would otherwise swamp the first layer
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
        x = (x - mean) / std
        return LocalData(TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]), data.label_names)
