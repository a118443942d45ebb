"""reference backend: the quantized graph run by torch, qc:: ops by their reference kernels.

The artifact stores the graph as QDQ ONNX (the same file the onnx backend writes); loading
imports it back into the IR, where each QuantizeLinear/DequantizeLinear pair becomes
qc::fake_quant again, and runs it with torch.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from qcompiler.ir import Graph

from . import onnx as onnx_backend

RUNTIME = "torch"


def emit(graph: Graph) -> dict[str, bytes]:
    return onnx_backend.emit(graph)


class Runner:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.input_names = [s.name for s in graph.inputs]
        self.output_names = [s.name for s in graph.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = self.graph.run_named(feeds)
        return {k: v.numpy() for k, v in out.items()}


def load(artifact_dir: str, manifest: dict) -> Runner:
    from qcompiler.frontends.onnx import load_onnx
    return Runner(load_onnx(os.path.join(artifact_dir, "model.onnx")))
