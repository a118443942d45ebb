"""graph_io: the plain (JSON + blob) serialization of the IR round-trips every argument kind."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import qcompiler
from qcompiler import graph_io
from qcompiler.errors import QCError


def _graph() -> qcompiler.Graph:
    g = fx.Graph()
    x = g.placeholder("x")
    g.call_function(torch.ops.aten._assert_tensor_metadata.default, (x,),
                    {"dtype": torch.int64, "device": torch.device("cpu"), "layout": torch.strided})
    w = g.get_attr("w")
    y = g.call_function(torch.ops.aten.mul.Tensor, (g.call_function(torch.ops.aten._to_copy.default, (x,),
                                                                    {"dtype": torch.float32}), w))
    z = g.call_function(torch.ops.aten.add.Tensor, (y, 0.1))
    g.output((z,))
    root = torch.nn.Module()
    root.register_buffer("w", torch.tensor([0.5, -2.0], dtype=torch.float32))
    return qcompiler.Graph(fx.GraphModule(root, g), [qcompiler.TensorSpec("x", (2,), "int64")],
                           [qcompiler.TensorSpec("y", (2,), "float32")])


def test_round_trip_keeps_kwargs_floats_and_constants():
    """dtype / device / layout kwargs, exact floats and constants survive dump -> load; bytes are deterministic."""
    g = _graph()
    doc, blob = graph_io.dump(g)
    assert graph_io.dump(g) == (doc, blob)
    back = graph_io.load(doc, blob)
    x = torch.tensor([3, 4])
    assert torch.equal(back(x)[0], g(x)[0])


def test_corrupt_document_is_a_clear_error():
    """A truncated or foreign document is refused with a QCError, not a traceback."""
    doc, blob = graph_io.dump(_graph())
    with pytest.raises(QCError, match="corrupt"):
        graph_io.load(doc[:20], blob)
    with pytest.raises(QCError, match="not a qcompiler graph"):
        graph_io.load(b'{"format": "other"}', blob)
