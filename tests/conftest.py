"""Shared fixtures: small seeded models, their ONNX files and calibration sets."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


class SmallCNN(torch.nn.Module):
    """conv-BN-ReLU x2, max-pool, global average pool, linear: the shape of the CNNs we compile."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.c2, self.b2 = torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def make_small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    m = SmallCNN()
    for bn in (m.b1, m.b2):  # non-trivial running statistics so folding is really tested
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture
def small_cnn():
    return make_small_cnn()


@pytest.fixture(scope="session")
def cnn_files(tmp_path_factory):
    """A small CNN as .onnx (legacy exporter, dynamic batch) with a calibration .npz."""
    d = tmp_path_factory.mktemp("cnn")
    m = make_small_cnn()
    onnx_path = d / "cnn.onnx"
    torch.onnx.export(m, (torch.randn(2, 3, 16, 16),), str(onnx_path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, opset_version=17,
                      do_constant_folding=False)  # keep BatchNormalization nodes for the importer to fold
    rng = np.random.default_rng(0)
    np.savez(d / "calib.npz", image=rng.standard_normal((32, 3, 16, 16)).astype(np.float32))
    np.savez(d / "inputs.npz", image=rng.standard_normal((5, 3, 16, 16)).astype(np.float32))
    return {"dir": d, "onnx": onnx_path, "calib": d / "calib.npz", "inputs": d / "inputs.npz", "module": m}
