"""Calibration data: arrays keyed by model input name, samples along axis 0, checked
against the model's inputs before any pass sees them."""
from __future__ import annotations

import itertools
import os
import zipfile
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

from .errors import QCError
from .ir import TensorSpec


def read_npz(path: str | os.PathLike, what: str = "input") -> dict[str, np.ndarray]:
    """Arrays of an .npz file (never unpickled); a QCError naming the file when it cannot be read."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QCError(f"{path}: {what} file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise QCError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


class CalibData:
    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int = 8, source: str = "calibration data"):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.batch_size = max(1, int(batch_size))
        self.source = source

    @staticmethod
    def from_npz(path: str | os.PathLike, batch_size: int = 8) -> "CalibData":
        return CalibData(read_npz(path, "calibration"), batch_size, source=os.fspath(path))

    @staticmethod
    def from_batches(batches: Iterable[Mapping[str, Any]], batch_size: int = 8,
                     source: str = "calibration loader") -> "CalibData":
        """From any iterable of {input name: array or tensor} batches (a DataLoader, a generator)."""
        parts: dict[str, list[np.ndarray]] = {}
        for b in batches:
            for k, v in b.items():
                parts.setdefault(k, []).append(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
        if not parts:
            raise QCError(f"{source}: empty calibration set (the loader yielded no batches)")
        try:
            arrays = {k: np.concatenate(v) for k, v in parts.items()}
        except ValueError as e:
            raise QCError(f"{source}: batches cannot be stacked ({e}); pad variable-length inputs to one length") from None
        return CalibData(arrays, batch_size, source=source)

    @property
    def num_samples(self) -> int:
        return min((len(v) for v in self.arrays.values()), default=0)

    def validate(self, inputs: list[TensorSpec]) -> None:
        """Names, sample counts, shapes and values must fit the model's inputs."""
        src = self.source
        if not self.arrays:
            raise QCError(f"{src}: contains no arrays")
        names = [s.name for s in inputs]
        missing = [n for n in names if n not in self.arrays]
        extra = [k for k in self.arrays if k not in names]
        if missing or extra:
            raise QCError(f"{src}: arrays {sorted(self.arrays)} do not match the model inputs {names}"
                          + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else ""))
        counts = {k: len(v) if v.ndim else 0 for k, v in self.arrays.items()}
        if any(c == 0 for c in counts.values()):
            raise QCError(f"{src}: empty calibration set (0 samples in {[k for k, c in counts.items() if c == 0]})")
        if len(set(counts.values())) > 1:
            raise QCError(f"{src}: inputs have different sample counts {counts}")
        for spec in inputs:
            a = self.arrays[spec.name]
            if a.ndim != len(spec.shape):
                raise QCError(f"{src}: '{spec.name}' has shape {list(a.shape)} but the model input is {list(spec.shape)} "
                              "(samples go along axis 0)")
            for i, (d, s) in enumerate(zip(spec.shape[1:], a.shape[1:]), start=1):
                if isinstance(d, int) and d != s:
                    raise QCError(f"{src}: '{spec.name}' dim {i} is {s}, the model expects {d} (shape {list(spec.shape)})")
            if a.dtype.kind not in "fiub":
                raise QCError(f"{src}: '{spec.name}' has dtype {a.dtype}, not numeric")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                bad = int((~np.isfinite(a)).sum())
                raise QCError(f"{src}: '{spec.name}' contains {bad} NaN/inf values")
            want = spec.dtype
            if (want.startswith("float") and a.dtype.kind not in "f") or (want.startswith("int") and a.dtype.kind not in "iu"):
                raise QCError(f"{src}: '{spec.name}' has dtype {a.dtype}, the model expects {want}")

    def batches(self, inputs: list[TensorSpec], max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """Tensors per batch, in input order; at most `max_batches` batches (None: all)."""
        for i in itertools.islice(range(0, self.num_samples, self.batch_size), max_batches):
            yield tuple(torch.from_numpy(np.ascontiguousarray(self.arrays[s.name][i:i + self.batch_size]))
                        .to(s.torch_dtype()) for s in inputs)

    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)
