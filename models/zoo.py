"""The model registry the compiler, demo, tests and benchmarks share: `get(name) -> ZooModel`.

| name        | model                                | inputs                              | metric |
|-------------|--------------------------------------|-------------------------------------|--------|
| minilm      | all-MiniLM-L6-v2 sentence encoder    | input_ids, attention_mask [B,S] i64 | cosine |
| fashion_cnn | Fashion-MNIST CNN (468 k params)     | image [B,1,28,28] f32 in [0,1]      | top1   |
| fashion_vit | Fashion-MNIST ViT (307 k params)     | image [B,1,28,28] f32 in [0,1]      | top1   |
| digits_cnn  | sklearn 8x8 digits CNN (tests)       | image [B,1,8,8] f32 in [0,1]        | top1   |

Calibration data comes from the training side (the first n train images; MiniLM's
calibration sentences), evaluation data from the test side (the first n test images;
MiniLM's evaluation sentences); the two never overlap. Text arrays of one call are padded
to the longest sentence in that call. "cosine" means: compare embeddings with the float
model's; there are no labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from qcompiler.errors import QCError

NAMES = ("minilm", "fashion_cnn", "fashion_vit", "digits_cnn")
Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class ZooModel:
    """A model with everything needed to compile and score it."""

    name: str
    module: nn.Module  # eval mode, fresh for every get(): passes may change it
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    dynamic: dict[str, dict[int, str]]  # {input_name: {dim: symbol}}
    metric: str  # "cosine" | "top1"
    calib: Callable[..., Arrays]  # calib(n=64): calibration inputs keyed by input name, samples on axis 0
    eval_inputs: Callable[..., Arrays]  # eval_inputs(n=None): evaluation inputs (None: the whole set)
    eval_labels: Callable[..., np.ndarray | None]  # eval_labels(n=None): int64 labels, or None (cosine metric)


def _minilm() -> ZooModel:
    from . import corpus
    from .minilm import load_minilm, tokenize

    names = ["input_ids", "attention_mask"]
    ex = tokenize(["A compiler for quantized neural networks.", "It maps each float tensor to small integers."])
    return ZooModel(
        "minilm", load_minilm(), tuple(torch.from_numpy(ex[k]) for k in names), names,
        {k: {0: "batch", 1: "seq"} for k in names}, "cosine",
        calib=lambda n=64: tokenize(corpus.calibration_sentences(n)),
        eval_inputs=lambda n=None: tokenize(corpus.evaluation_sentences(256 if n is None else n)),
        eval_labels=lambda n=None: None)


def _images(name: str, module: nn.Module, size: int, data: Callable[[str], tuple[np.ndarray, np.ndarray]]) -> ZooModel:
    example = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    return ZooModel(
        name, module, (example,), ["image"], {"image": {0: "batch"}}, "top1",
        calib=lambda n=64: {"image": data("train")[0][:n].copy()},
        eval_inputs=lambda n=None: {"image": data("test")[0][:n].copy()},
        eval_labels=lambda n=None: data("test")[1][:n].copy())


def get(name: str) -> ZooModel:
    """The zoo entry `name` (one of NAMES), with a freshly loaded module."""
    if name == "minilm":
        return _minilm()
    if name in ("fashion_cnn", "fashion_vit"):
        from .fashion import load_fashion, load_fashion_mnist
        return _images(name, load_fashion(name.split("_")[1]), 28, load_fashion_mnist)
    if name == "digits_cnn":
        from .digits import digits_data, load_digits_model
        return _images(name, load_digits_model(), 8, digits_data)
    raise QCError(f"unknown zoo model '{name}' (known: {', '.join(NAMES)})")
