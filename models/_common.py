"""Helpers shared by the model files: weight files (.npz, never pickle) and paths."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from qcompiler.errors import QCError

WEIGHTS = Path(__file__).resolve().parent / "weights"
REPO_ROOT = Path(__file__).resolve().parent.parent


def save_npz(module: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write `module.state_dict()` as numpy arrays keyed by state_dict names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v.detach().cpu().numpy() for k, v in module.state_dict().items()})
    return path


def load_npz(module: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load weights written by `save_npz` into `module` (strict) and put it in eval mode."""
    if not Path(path).is_file():
        raise QCError(f"weight file {path} is missing (reinstall qcompiler or retrain the model)")
    with np.load(path, allow_pickle=False) as z:
        module.load_state_dict({k: torch.from_numpy(z[k].copy()) for k in z.files})
    return module.eval()


@torch.no_grad()
def predict(module: torch.nn.Module, x: np.ndarray | torch.Tensor, batch: int = 500) -> np.ndarray:
    """Argmax class of `module` over `x`, in batches, on the device of the module's parameters."""
    x, dev = torch.as_tensor(x), next(module.parameters()).device
    return torch.cat([module(x[i:i + batch].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch)]).numpy()
