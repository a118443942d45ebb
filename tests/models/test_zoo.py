import numpy as np
import pytest
import torch
from torch.export import Dim

from qcompiler.errors import QCError
from qcompiler.models import NAMES, zoo

SHAPES = {"minilm": (384,), "fashion_cnn": (10,), "fashion_vit": (10,), "digits_cnn": (10,)}


@pytest.fixture(scope="module", params=NAMES)
def entry(request):
    if request.param.startswith("fashion"):
        try:
            from qcompiler.models.fashion import data_dir
            data_dir()
        except QCError:
            pytest.skip("Fashion-MNIST is not installed (run `make data`)")
    if request.param == "digits_cnn":
        pytest.importorskip("sklearn")
    return zoo.get(request.param)


def test_entry_is_consistent(entry):
    """Names, example inputs, dynamic dims and calib/eval arrays agree with each other, and the module runs."""
    assert entry.name in NAMES and not entry.module.training
    assert len(entry.input_names) == len(entry.example_inputs) and set(entry.dynamic) == set(entry.input_names)
    with torch.no_grad():
        out = entry.module(*entry.example_inputs)
    assert out.shape == (entry.example_inputs[0].shape[0], *SHAPES[entry.name])
    calib, evals = entry.calib(5), entry.eval_inputs(7)
    for arrays, n in ((calib, 5), (evals, 7)):
        assert list(arrays) == entry.input_names
        for name, ex in zip(entry.input_names, entry.example_inputs):
            a = arrays[name]
            assert a.shape[0] == n and a.ndim == ex.ndim and a.dtype == ex.numpy().dtype
            static = [d for d in range(ex.ndim) if d not in entry.dynamic[name]]
            assert [a.shape[d] for d in static] == [ex.shape[d] for d in static]
    labels = entry.eval_labels(7)
    assert (entry.metric == "cosine") == (labels is None)
    if labels is not None:
        assert labels.shape == (7,) and labels.dtype == np.int64


def test_exports_with_dynamic_dims(entry):
    """torch.export with Dim.AUTO on the declared dims gives a program that runs on other sizes."""
    dyn = {n: {d: Dim.AUTO for d in entry.dynamic[n]} for n in entry.input_names}
    ep = torch.export.export(entry.module, entry.example_inputs, dynamic_shapes=dyn)
    other = entry.eval_inputs(3)
    inputs = tuple(torch.from_numpy(other[n]) for n in entry.input_names)
    assert inputs[0].shape != entry.example_inputs[0].shape
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*inputs), entry.module(*inputs), rtol=1e-5, atol=1e-5)


def test_unknown_name():
    """An unknown name is a QCError listing the known ones."""
    with pytest.raises(QCError, match="fashion_cnn"):
        zoo.get("resnet")
