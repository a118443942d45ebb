"""reference backend: the quantized graph run by torch, qc:: ops by their reference kernels.

A fake-quant graph is stored as QDQ ONNX (the same file the onnx backend writes); loading
imports it back into the IR, where each QuantizeLinear/DequantizeLinear pair becomes
qc::fake_quant again. An integer-only graph (qc:: integer ops) is stored as-is by
qcompiler.graph_io (model.qgraph.json + model.qgraph.bin); loading rebuilds the fx graph.
Either way torch runs it, with the reference kernels that define the ops.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from qcompiler.ir import Graph

from . import onnx as onnx_backend

RUNTIME = "torch"


INTEGER = True  # takes integer-only graphs
GRAPH, BLOB = "model.qgraph.json", "model.qgraph.bin"


def emit(graph: Graph) -> dict[str, bytes]:
    if "integer" in graph.meta.get("facts", []):
        from qcompiler import graph_io
        doc, blob = graph_io.dump(graph)
        return {GRAPH: doc, BLOB: blob}
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
    if GRAPH in manifest.get("files", {}):
        from qcompiler import graph_io
        with open(os.path.join(artifact_dir, GRAPH), "rb") as f, open(os.path.join(artifact_dir, BLOB), "rb") as b:
            return Runner(graph_io.load(f.read(), b.read()))
    from qcompiler.frontends.onnx import load_onnx
    return Runner(load_onnx(os.path.join(artifact_dir, "model.onnx")))
