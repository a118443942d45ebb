import re
import sys
from pathlib import Path

import pytest
import torch

import qcompiler
from qcompiler import EXACT, Pass, PassManager, PassResult, QCError
from qcompiler.errors import PassError
from qcompiler.pipeline import registered, resolve

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_pass_source() -> str:
    text = README.read_text()
    section = text[text.index("## Writing a pass"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def readme_pass_module(tmp_path, monkeypatch):
    (tmp_path / "readme_pass_mod.py").write_text(_readme_pass_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "readme_pass_mod"
    sys.modules.pop("readme_pass_mod", None)
    qcompiler.pipeline._REGISTRY.pop("drop_mul_by_one", None)


class MulByOne(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x * 1) * 1.0 + x * 2


def test_readme_pass_is_short_and_works(readme_pass_module):
    """The README's custom pass is under 25 lines, loads by module:Class, fires twice and keeps outputs."""
    assert len([l for l in _readme_pass_source().splitlines() if l.strip()]) < 25
    g = qcompiler.trace(MulByOne(), (torch.randn(3, 4),))
    x = torch.randn(3, 4)
    before = g(x)[0]
    pm = PassManager([f"{readme_pass_module}:DropMulByOne"], verify_each=True)
    out = pm.run(g)
    assert pm.record[0]["stats"] == {"MulByOneIntoIdentity": 2} and pm.record[0]["changed"]
    torch.testing.assert_close(out(x)[0], before, rtol=1e-5, atol=1e-5)
    assert "drop_mul_by_one" in registered()


def test_readme_pass_declines_with_reason(readme_pass_module):
    """int64 x * 1.0 changes the dtype: the rule declines and the reason is recorded."""

    class IntTimesOne(torch.nn.Module):
        def forward(self, x):
            return x * 1.0

    mod = __import__(readme_pass_module)
    pm = PassManager([mod.DropMulByOne])
    g = qcompiler.trace(IntTimesOne(), (torch.arange(6).reshape(2, 3),))
    pm.run(g)
    assert pm.record[0]["changed"] is False
    assert any("changes dtype" in d for d in pm.record[0]["declined"])


def test_requires_is_enforced_and_names_passes_run():
    """A pass whose requirement no earlier pass provides fails naming what ran before."""
    g = qcompiler.trace(torch.nn.Linear(3, 3), (torch.randn(2, 3),))
    with pytest.raises(PassError, match=r"fake_quant.*requires.*calibrated.*passes run: \['fold_bn'\]"):
        PassManager(["fold_bn", "fake_quant"]).run(g)


class BreaksGraph(Pass):
    """Leaves an unused node behind: the verifier must catch it."""

    numerics = EXACT

    def run(self, graph, ctx):
        out = graph.graph.output_node()
        with graph.graph.inserting_before(out):
            n = graph.graph.call_function(torch.ops.aten.relu.default, (graph.placeholders()[0],))
        n.meta["val"] = graph.placeholders()[0].meta["val"]
        return PassResult(graph, True)


def test_verify_each_names_failing_pass():
    """With verify_each, a pass that corrupts the graph is named along with the passes before it."""
    g = qcompiler.trace(torch.nn.Linear(3, 3), (torch.randn(2, 3),))
    with pytest.raises(PassError, match=r"pass 'breaks_graph' failed after \[remove_identities\].*never used"):
        PassManager(["remove_identities", BreaksGraph], verify_each=True).run(g)


def test_unknown_pass_names_choices():
    """An unknown pass name or a non-pass class is a QCError listing the registered ones."""
    with pytest.raises(QCError, match="unknown pass 'nope'.*fold_bn"):
        resolve("nope")
    with pytest.raises(QCError, match="cannot load pass"):
        resolve("no_such_module_xyz:Foo")
    with pytest.raises(QCError, match="not a qcompiler Pass"):
        resolve("qcompiler.errors:QCError")


def test_builtin_passes_registered_with_contracts():
    """Every built-in pass is registered under its name with a declared numeric contract and a docstring."""
    reg = registered()
    for name in ["fold_bn", "fold_constants", "remove_identities", "dce", "annotate", "calibrate", "fake_quant"]:
        assert name in reg
        assert reg[name].numerics in ("exact", "tolerant", "numerics") and reg[name].__doc__


def test_fold_constants_and_identities():
    """Constant subgraphs become buffers, eval-mode dropout disappears, outputs are unchanged."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 5))
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(x @ self.w.t() * 2).contiguous()

    m = M().eval()
    g = qcompiler.trace(m, (torch.randn(2, 5),))
    x = torch.randn(3, 5)
    pm = PassManager(["remove_identities", "fold_constants"], verify_each=True)
    out = pm.run(g)
    names = {qcompiler.ir.op_name(n) for n in out.op_nodes()}
    assert "aten.dropout" not in names and "aten.t" not in names and "aten.contiguous" not in names
    assert pm.record[1]["stats"]["folded"] >= 1
    torch.testing.assert_close(out(x)[0], m(x), rtol=1e-5, atol=1e-5)
