"""Fashion-MNIST: data loader, a small CNN and a small ViT, and the recipe that trained them.

Images are float32 [N, 1, 28, 28], pixel / 255 so every value lies in [0, 1] (no mean/std
normalisation, so the input range is known exactly: what quantizers of the first layer want).
Labels are int64 [N] in 0..9.

The committed weights (`weights/fashion_cnn.npz`, `weights/fashion_vit.npz`) came from

    python -m qcompiler.models.fashion cnn --epochs 5 --threads 2    # 92.85 %, 562 s on 2 shared CPU cores
    python -m qcompiler.models.fashion vit --epochs 6 --device cuda  # 88.05 %, 29 s on one H100

and reach the test top-1 in `TEST_TOP1` (full 10 k test split). The ViT recipe runs on CPU
too (about 6 min on 2 free cores); a CPU run gives other weights of about the same accuracy.
"""
from __future__ import annotations

import argparse
import functools
import gzip
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qcompiler.errors import QCError

from ._common import REPO_ROOT, WEIGHTS, load_npz, predict, save_npz

TEST_TOP1 = {"cnn": 0.9285, "vit": 0.8805}  # full 10 k test split
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # where `apt-get install dataset-fashion-mnist` puts it
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def data_dir() -> Path:
    """First folder holding the idx.gz files: $QC_FASHION_MNIST_DIR, <repo>/.data/fashion-mnist,
    ./.data/fashion-mnist, /usr/share/datasets/fashion-mnist."""
    candidates = [os.environ.get("QC_FASHION_MNIST_DIR"), REPO_ROOT / ".data" / "fashion-mnist",
                  Path.cwd() / ".data" / "fashion-mnist", SYSTEM_DIR]
    for c in candidates:
        if c and all((Path(c) / f).is_file() for f in _FILES["train"] + _FILES["test"]):
            return Path(c)
    raise QCError("Fashion-MNIST not found (looked in $QC_FASHION_MNIST_DIR, .data/fashion-mnist, "
                  "/usr/share/datasets/fashion-mnist); run `make data` to fetch it into .data/")


@functools.cache
def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [N,1,28,28] in [0,1], labels int64 [N]) of "train" (60 k) or "test" (10 k).

    The arrays are cached and shared between callers: copy before writing into them.
    """
    if split not in _FILES:
        raise QCError(f"unknown Fashion-MNIST split '{split}' (use 'train' or 'test')")
    root = data_dir()
    img_file, lbl_file = (gzip.open(root / f).read() for f in _FILES[split])
    n, rows, cols = np.frombuffer(img_file, ">u4", 3, offset=4)
    images = np.frombuffer(img_file, np.uint8, offset=16).reshape(n, 1, rows, cols).astype(np.float32) / 255
    labels = np.frombuffer(lbl_file, np.uint8, offset=8).astype(np.int64)
    return images, labels


class FashionCNN(nn.Module):
    """4 x (conv3x3 + BatchNorm + ReLU) with a 2x2 max-pool after the 2nd and 4th, then 2 Linear (468 k params)."""

    def __init__(self, widths: tuple[int, int] = (32, 64), hidden: int = 128, classes: int = 10):
        super().__init__()
        a, b = widths

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(1, a), *block(a, a), nn.MaxPool2d(2),
                                      *block(a, b), *block(b, b), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(b * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.features(image).flatten(1))))


class Attention(nn.Module):
    """Multi-head self-attention written as matmul / softmax / matmul so passes see each op."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class FashionViT(nn.Module):
    """Pre-LN ViT: 4x4 patches (conv), cls token, learned positions, depth 4, dim 96, 4 heads, MLP x2 (307 k params)."""

    def __init__(self, patch: int = 4, dim: int = 96, depth: int = 4, heads: int = 4, mlp_ratio: int = 2,
                 classes: int = 10, size: int = 28, channels: int = 1):
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


ARCHS = {"cnn": FashionCNN, "vit": FashionViT}
RECIPES = {  # AdamW, linear warm-up then cosine decay to 0, batch 128; `augment`: random crop (pad 2) + flip
    "cnn": dict(lr=3e-3, weight_decay=5e-4, warmup=200, augment=True),
    "vit": dict(lr=2e-3, weight_decay=0.05, warmup=400, augment=False),  # 6 epochs: 88.2 % without, 84.6 % with
}


def _arch(name: str) -> str:
    if name not in ARCHS:
        raise QCError(f"unknown Fashion-MNIST model '{name}' (use one of {sorted(ARCHS)})")
    return name


def load_fashion(name: str) -> nn.Module:
    """The trained "cnn" or "vit" from its committed weights, in eval mode."""
    return load_npz(ARCHS[_arch(name)](), WEIGHTS / f"fashion_{name}.npz")


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop after zero padding by `pad`, and a random horizontal flip, per image."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad,) * 4)
    dy, dx = (torch.randint(0, 2 * pad + 1, (b,), generator=gen) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = xp[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def train(model_name: str, epochs: int, steps: int | None = None, seed: int = 0,
          out: str | os.PathLike | None = None, batch: int = 128, device: str = "cpu") -> tuple[nn.Module, float]:
    """Train "cnn" or "vit" from scratch, save its weights as .npz and return (model, test top-1).

    Deterministic on CPU for a given seed and thread count (batches and augmentation are drawn
    on the CPU, so a CUDA run sees the same data). `steps` stops after that many optimizer
    steps (smoke tests); then the returned top-1 is over the first 500 test images only, else
    over the full test split. `out` defaults to the committed weight file.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    recipe = RECIPES[_arch(model_name)]
    model = ARCHS[model_name]().to(device)
    x_train, y_train = map(torch.from_numpy, load_fashion_mnist("train"))
    x_test, y_test = load_fashion_mnist("test")
    per_epoch = len(x_train) // batch
    total = min(epochs * per_epoch, steps or epochs * per_epoch)
    decay, rest = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() > 1 and "embed" not in n and "token" not in n else rest).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe["lr"])
    warm = min(recipe["warmup"], max(total // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1))))
    print(f"train {model_name}: {sum(p.numel() for p in model.parameters())} params, {total} steps "
          f"({epochs} epochs x {per_epoch}), seed {seed}, {device}, {torch.get_num_threads()} threads", flush=True)
    start, step, top1 = time.time(), 0, float("nan")
    for epoch in range(epochs):
        model.train()
        order, running = torch.randperm(len(x_train), generator=gen), 0.0
        for i in range(per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            xb = augment(x_train[idx], gen) if recipe["augment"] else x_train[idx]
            loss = F.cross_entropy(model(xb.to(device)), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step, running = step + 1, running + loss.item()
            if step % 100 == 0 or step == total:
                print(f"  epoch {epoch + 1} step {step}/{total} loss {running / (i + 1):.4f} "
                      f"{time.time() - start:.0f}s", flush=True)
            if step == total:
                break
        model.eval()
        n_eval = len(x_test) if steps is None else min(500, len(x_test))
        top1 = float((predict(model, x_test[:n_eval]) == y_test[:n_eval]).mean())
        print(f"epoch {epoch + 1}: test top-1 {top1:.4f} on {n_eval} images, {time.time() - start:.0f}s", flush=True)
        if step == total:
            break
    path = save_npz(model, out if out is not None else WEIGHTS / f"fashion_{model_name}.npz")
    print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)
    return model, top1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train a Fashion-MNIST model and write its .npz weights.")
    ap.add_argument("model", choices=sorted(ARCHS))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args.model, args.epochs, steps=args.steps, seed=args.seed, out=args.out, device=args.device)


if __name__ == "__main__":
    main()
