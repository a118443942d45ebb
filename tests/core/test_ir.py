import operator

import pytest
import torch

import qcompiler
from qcompiler import QCError
from qcompiler.ir import TensorSpec, verify


def _mlp_graph():
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).eval()
    return qcompiler.trace(m, (torch.randn(2, 6),))


def _node(g, name):
    return next(n for n in g.nodes if n.name == name)


def test_traced_graph_verifies_with_dynamic_batch():
    """A traced graph verifies and names its dynamic batch dim in inputs and outputs."""
    g = _mlp_graph()
    verify(g)
    assert g.inputs == [TensorSpec("input", ("batch", 6), "float32")]
    assert g.outputs[0].shape == ("batch", 3)


def test_wrong_weight_shape_is_caught_at_its_node():
    """A rewrite that leaves a weight of the wrong shape fails verification naming the consumer."""
    g = _mlp_graph()
    w = _node(g, "linear_1").args[1]
    g.gm.register_buffer(w.target, torch.zeros(3, 4))
    with pytest.raises(QCError, match="node 'linear_1', op 'aten.linear': shape/dtype propagation fails"):
        verify(g)


def test_recorded_dtype_disagreement_is_caught():
    """A node whose recorded value disagrees with what its op computes is reported with both."""
    g = _mlp_graph()
    relu = _node(g, "relu")
    relu.meta["val"] = relu.meta["val"].to(torch.float16)
    with pytest.raises(QCError, match=r"node 'relu'.*recorded value float16\[.*computes: float32"):
        verify(g)


def test_foreign_ops_and_dangling_values_are_rejected():
    """A non-IR call and an unused value are each named."""
    g = _mlp_graph()
    relu = _node(g, "relu")
    with g.graph.inserting_after(relu):
        bad = g.graph.call_function(torch.nn.functional.relu, (relu,))
    relu.replace_all_uses_with(bad)
    bad.args = (relu,)
    with pytest.raises(QCError, match="not in the IR"):
        verify(g)
    g = _mlp_graph()
    with g.graph.inserting_after(_node(g, "relu")):
        g.graph.call_function(operator.neg, (_node(g, "relu"),))
    with pytest.raises(QCError, match="never used"):
        verify(g)


def test_output_arity_must_match_declared_outputs():
    """Declaring two outputs for a graph that returns one is an error."""
    g = _mlp_graph()
    g.outputs.append(TensorSpec("extra", (1,), "float32"))
    with pytest.raises(QCError, match="returns 1 values but 2 outputs"):
        verify(g)
