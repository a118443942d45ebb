"""scikit-learn's 8x8 digits and a tiny CNN for fast tests.

Images are float32 [N, 1, 8, 8], pixel / 16 so values lie in [0, 1]; labels int64 [N].
The split is fixed and needs no RNG: every 4th sample (index % 4 == 0) is test (450), the
rest train (1347). The committed `weights/digits_cnn.npz` came from
`python -m qcompiler.models.digits` (seed 0, 1 thread, a few seconds) and reaches
`TEST_TOP1` on the test split.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qcompiler.errors import QCError

from ._common import WEIGHTS, load_npz, predict, save_npz

TEST_TOP1 = 0.9978  # 449 / 450


@functools.cache
def _load() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise QCError("the digits data needs scikit-learn: install qcompiler[test]") from None
    d = load_digits()
    return (d.images[:, None] / 16).astype(np.float32), d.target.astype(np.int64)


def digits_data(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [N,1,8,8] in [0,1], labels int64 [N]) of the fixed "train" or "test" split."""
    if split not in ("train", "test"):
        raise QCError(f"unknown digits split '{split}' (use 'train' or 'test')")
    x, y = _load()
    keep = (np.arange(len(x)) % 4 == 0) == (split == "test")
    return x[keep], y[keep]


class DigitsCNN(nn.Module):
    """conv3x3+BN+ReLU, conv3x3+BN+ReLU, 2x2 max-pool, Linear (on 1x8x8 inputs)."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * 4 * 4, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(image)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


def load_digits_model() -> DigitsCNN:
    """The trained DigitsCNN from its committed weights, in eval mode."""
    return load_npz(DigitsCNN(), WEIGHTS / "digits_cnn.npz")


def train_digits(epochs: int = 30, seed: int = 0, out: str | os.PathLike | None = None) -> tuple[DigitsCNN, float]:
    """Train DigitsCNN (AdamW 3e-3, batch 64, cosine), save .npz, return (model, test top-1)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = map(torch.from_numpy, digits_data("train"))
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * -(-len(x) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    xt, yt = digits_data("test")
    top1 = float((predict(model, xt) == yt).mean())
    save_npz(model, out if out is not None else WEIGHTS / "digits_cnn.npz")
    return model, top1


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"digits_cnn test top-1 {train_digits()[1]:.4f}")
