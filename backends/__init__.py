"""Backends. A backend offers `emit(graph) -> {filename: bytes}` and
`load(artifact_dir, manifest) -> Runner` where a Runner maps {input name: array} to
{output name: array}; INTEGER says it takes integer-only graphs, INTEGER_ONLY that it
takes nothing else. onnx and reference are modules; the TVM targets are objects of
backends.tvm (one per target string, e.g. "tvm-cuda:sm_90"). A backend never imports a pass."""
from __future__ import annotations

import importlib

from qcompiler.errors import QCError

BACKENDS = {"onnx": "qcompiler.backends.onnx", "reference": "qcompiler.backends.reference",
            "tvm-llvm": "qcompiler.backends.tvm", "tvm-cuda": "qcompiler.backends.tvm"}


def get(name: str):
    base = name.partition(":")[0]
    if base not in BACKENDS or (base != name and not base.startswith("tvm-")):
        raise QCError(f"unknown target '{name}' (choose from {', '.join(BACKENDS)}; tvm targets take ':ARCH')")
    mod = importlib.import_module(BACKENDS[base])
    return mod.backend(name) if base.startswith("tvm-") else mod
