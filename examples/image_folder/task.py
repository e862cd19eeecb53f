"""A small CNN on a site's own image folder (one sub-folder per class): convolutions and a linear
head, so adapters sit on nn.Conv2d layers as well as on nn.Linear ones.

The run config names it as `image_folder.task:FolderCNN`; each site's data file says where its
images are and their size (see make_data.py, which writes PNG folders from scikit-learn digits).
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
    image_size: tuple[int, ...] = (8, 8)     # [height, width] of every site's images
    channels: int = 1
    n_classes: int = 10
    width: int = 8                           # channels of the first convolution (the second has twice)

    def validate(self) -> None:
        if len(self.image_size) != 2 or min(self.image_size) < 4 or any(s % 2 for s in self.image_size):
            raise ValueError("image_size: [height, width], even and at least 4 (one 2x2 pooling)")
        if self.n_classes < 2 or self.width < 1 or self.channels not in (1, 3, 4):
            raise ValueError("n_classes: at least 2 classes, a positive width and 1, 3 or 4 channels")


class CNN(nn.Module):
    def __init__(self, o: Options):
        super().__init__()
        h, w = o.image_size
        self.conv1 = nn.Conv2d(o.channels, o.width, 3, padding=1)
        self.conv2 = nn.Conv2d(o.width, 2 * o.width, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(2 * o.width * (h // 2) * (w // 2), o.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(x.flatten(1))


class FolderCNN(FederatedTask):
    name = "folder-cnn"
    version = "1.0.0"
    Options = Options
    metrics = ("accuracy", "loss")
    targets = ("conv1", "conv2", "head")

    def build_model(self) -> nn.Module:
        return CNN(self.options)

    def load_data(self, data: SiteDataset) -> LocalData:
        o = self.options
        expected = (o.channels, *o.image_size)
        if data.images is None or tuple(data.images.shape[1:]) != expected:
            got = None if data.images is None else tuple(data.images.shape[1:])
            raise ValueError(f"image_size: the model takes images {expected} (channels, height, width), {data.path} "
                             f"holds {got}")
        if len(data.label_names) != o.n_classes:
            raise ValueError(f"labels: the model has {o.n_classes} classes, {data.path} declares {list(data.label_names)}")
        x, y = data.images, data.labels
        train, test = data.train_indices, data.test_indices
        return LocalData(TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]), data.label_names)
