import numpy as np
import pytest
import torch

import qcompiler
from qcompiler import QCError
from qcompiler.frontends.onnx import load_onnx
from qcompiler.ir import verify
from qcompiler.models import zoo


def _images(z, n=16):
    try:
        return z.eval_inputs(n)["image"]
    except QCError:  # Fashion-MNIST not fetched: real weights on seeded random images still test the import
        return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)).numpy()


@pytest.mark.parametrize("name", ["fashion_cnn", "fashion_vit"])
@pytest.mark.parametrize("dynamo", [False, True])
def test_fashion_models_import_from_onnx(name, dynamo, tmp_path):
    """The trained Fashion-MNIST CNN / ViT exported by either torch exporter import with outputs equal to torch (1e-5)."""
    z = zoo.get(name)
    path = tmp_path / f"{name}.onnx"
    kw = {"dynamic_axes": {"image": {0: "batch"}}} if not dynamo else {"dynamic_shapes": {"image": {0: torch.export.Dim("batch")}}}
    torch.onnx.export(z.module, z.example_inputs, str(path), input_names=["image"], output_names=["logits"],
                      dynamo=dynamo, **kw)
    g = load_onnx(path)
    verify(g)
    assert g.inputs[0].shape[0] == "batch" or isinstance(g.inputs[0].shape[0], str)
    x = _images(z)
    with torch.no_grad():
        ref = z.module(torch.from_numpy(x)).numpy()
    got = g.run_named({g.inputs[0].name: x})[g.outputs[0].name].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_pt2_loads_like_a_module(tmp_path):
    """A saved torch.export program loads into the same IR and computes the same outputs."""
    z = zoo.get("digits_cnn")
    ep = torch.export.export(z.module, z.example_inputs, dynamic_shapes=({0: torch.export.Dim.AUTO},))
    path = tmp_path / "digits.pt2"
    torch.export.save(ep, str(path))
    g = qcompiler.load_model(str(path))
    verify(g)
    x = z.eval_inputs(20)["image"]
    ref = z.module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(g(torch.from_numpy(x))[0].numpy(), ref, rtol=1e-5, atol=1e-5)
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(QCError, match="bad.pt2"):
        qcompiler.load_model(str(bad))
