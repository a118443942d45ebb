"""The model zoo: real pretrained MiniLM, Fashion-MNIST CNN / ViT, a tiny digits CNN, and their data.

`qcompiler.models.get(name)` returns a `ZooModel` (see zoo.py); the submodules load lazily.
"""
from .zoo import NAMES, ZooModel, get

__all__ = ["NAMES", "ZooModel", "get"]
