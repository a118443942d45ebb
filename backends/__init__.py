"""Backends. Each module offers `emit(graph) -> {filename: bytes}` and
`load(artifact_dir, manifest) -> Runner` where a Runner maps {input name: array} to
{output name: array}. A backend never imports a pass."""
from __future__ import annotations

import importlib

from qcompiler.errors import QCError

BACKENDS = {"onnx": "qcompiler.backends.onnx", "reference": "qcompiler.backends.reference"}


def get(name: str):
    if name not in BACKENDS:
        raise QCError(f"unknown target '{name}' (choose from {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[name])
