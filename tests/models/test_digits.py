import numpy as np
import pytest

pytest.importorskip("sklearn")

from qcompiler.models._common import predict  # noqa: E402
from qcompiler.models.digits import TEST_TOP1, digits_data, load_digits_model  # noqa: E402


def test_split_is_fixed_and_disjoint():
    """train/test are the fixed 1347/450 split of sklearn's digits, float32 in [0,1]."""
    (xa, ya), (xb, yb) = digits_data("train"), digits_data("test")
    assert xa.shape == (1347, 1, 8, 8) and xb.shape == (450, 1, 8, 8) and xa.dtype == np.float32
    assert ya.dtype == np.int64 and 0 <= xa.min() and xa.max() <= 1


def test_committed_model_accuracy():
    """The committed digits CNN reaches >= 0.9 test top-1 (and its recorded number)."""
    x, y = digits_data("test")
    acc = (predict(load_digits_model(), x) == y).mean()
    assert acc >= 0.9 and abs(acc - TEST_TOP1) <= 0.01
