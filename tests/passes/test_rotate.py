import pytest
import torch

import qcompiler
from qcompiler.calib import CalibData
from qcompiler.errors import QCError
from qcompiler.ir import is_op, verify
from qcompiler.models.fashion import FashionViT
from qcompiler.models.minilm import MiniLMEncoder
from qcompiler.passes.rotate import RotateHadamard, block_hadamard, hadamard, rotation, rotation_factors
from qcompiler.passes.smooth import FoldSmoothingScales
from qcompiler.pipeline import PassContext

aten = torch.ops.aten
nn = torch.nn
OUTLIERS = [1, 5, 9]
NAMES = ["input_ids", "attention_mask"]
SEQ = 7  # traced with a dynamic batch and this sequence length


def _minilm(seed=0):
    """A 2-layer MiniLM (hidden 32, 4 heads of 8, FFN 96 = 3 x 32) whose value rows and FFN-up rows
    of a few channels are scaled x50, so V and the down-projection input carry outlier channels."""
    torch.manual_seed(seed)
    m = MiniLMEncoder(vocab=50, dim=32, layers=2, heads=4, hidden=96, positions=16).eval()
    with torch.no_grad():
        for layer in m.layers:
            layer.attn.v.weight[OUTLIERS] *= 50
            layer.ffn.up.weight[OUTLIERS] *= 50
    return m


def _vit(seed=0):
    """A 2-block FashionViT (dim 48 = 3 x 16, 4 heads of 12 = 3 x 4, MLP 96 = 3 x 32) with random
    LayerNorm affines whose gamma has x50 outlier channels, and x50 outlier channels in the V third
    of qkv and in the MLP's first linear."""
    torch.manual_seed(seed)
    m = FashionViT(dim=48, depth=2, heads=4, mlp_ratio=2).eval()
    with torch.no_grad():
        for ln in [m.norm] + [b.ln1 for b in m.blocks] + [b.ln2 for b in m.blocks]:
            ln.weight.normal_()
            ln.bias.normal_()
            ln.weight[OUTLIERS] *= 50
        for blk in m.blocks:
            blk.attn.qkv.weight[[96 + i for i in OUTLIERS]] *= 50
            blk.mlp[0].weight[OUTLIERS] *= 50
    return m


def _text(n, s, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, s), generator=g)
    mask = torch.ones(n, s, dtype=torch.long)
    mask[0, s // 2:] = 0
    return ids, mask


def _assert_equiv(g, res, *x):
    """Outputs equal at rtol=atol=1e-5 relative to each output's max-abs."""
    for got, ref in zip(res.graph(*x), g(*x)):
        scale = float(ref.abs().max())
        torch.testing.assert_close(got / scale, ref / scale, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def minilm():
    return qcompiler.trace(_minilm(), _text(2, SEQ, 0), input_names=NAMES)


@pytest.fixture(scope="module")
def vit():
    return qcompiler.trace(_vit(), (torch.rand(2, 1, 28, 28),), input_names=["image"])


@pytest.fixture(scope="module")
def rotated(minilm, vit):
    """The rotate pass's result on each small model, verified."""
    out = {"minilm": RotateHadamard()(minilm.copy()), "vit": RotateHadamard()(vit.copy())}
    for res in out.values():
        verify(res.graph)
    return out


def test_hadamard_orthonormal():
    """hadamard(n) is symmetric with H H^T = I and entries +-1/sqrt(n); a non power of two is an error."""
    for n in (1, 2, 8, 64):
        h = hadamard(n)
        torch.testing.assert_close(h @ h.t(), torch.eye(n, dtype=h.dtype))
        assert torch.equal(h, h.t()) and torch.allclose(h.abs(), torch.full((n, n), n ** -0.5, dtype=h.dtype))
    with pytest.raises(QCError, match="power of two"):
        hadamard(6)


def test_block_hadamard_and_factored_rotation():
    """1536 -> 3 blocks of 512, 192 -> 3 of 64; the randomised rotation is orthogonal and its
    Kronecker factors compute the same x R as the dense matrix."""
    for width, block in ((1536, 512), (192, 64), (24, 8)):
        bh = block_hadamard(width)
        assert torch.equal(bh[:block, :block], hadamard(block)) and bh[:block, block:].abs().sum() == 0
        r = rotation(width, torch.Generator().manual_seed(1))
        torch.testing.assert_close(r @ r.t(), torch.eye(width, dtype=r.dtype))
        nb, a, b = rotation_factors(width, torch.Generator().manual_seed(1))
        x = torch.randn(5, width, dtype=torch.float64)
        y = (a.t() @ (x.reshape(5, nb, a.shape[0], b.shape[0]) @ b)).reshape(5, width)
        torch.testing.assert_close(y, x @ r)


def test_minilm_structure_and_equivalence(minilm, rotated):
    """MiniLM: 2 FFN down-projections get an online rotation (2 hadamard matmuls each), 2 value/out
    pairs are rotated offline, the post-LN residual stream is declined; outputs equal with padding."""
    res = rotated["minilm"]
    assert res.changed and res.stats == {"ffn_down_rotated": 2, "value_out_rotated": 2, "declined_residual": 1}
    assert len(res.declined) == 1 and "(post-LN): its affine does not commute" in res.declined[0]
    had = [n for n in res.graph.nodes if n.name.startswith("hadamard_")]
    assert sum(is_op(n, aten.matmul) for n in had) == 4 and sum(is_op(n, aten.matmul) for n in res.graph.nodes) == 8
    _assert_equiv(minilm, res, *_text(3, SEQ, 5))


def test_vit_structure_and_equivalence(vit, rotated):
    """FashionViT: fused qkv (only the V third rotated, head dim 12 = 3 blocks of 4), MLP 96 = 3 x 32,
    and the pre-LN residual stream (every LayerNorm affine moved into its linears); outputs equal."""
    res = rotated["vit"]
    assert res.stats == {"ffn_down_rotated": 2, "value_out_rotated": 2, "residual_rotated": 1} and not res.declined
    for ln in (n for n in res.graph.nodes if is_op(n, aten.layer_norm)):
        assert torch.equal(res.graph.attr(ln.args[2]), torch.ones(48)) and not res.graph.attr(ln.args[3]).any()
    _assert_equiv(vit, res, torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3)))


def test_after_smooth_folds_out_projection_scale(vit):
    """After SmoothQuant, the explicit 1/s in front of each out-projection and of the head is folded into
    W; the down-projection's 1/s stays in front of the online rotation; outputs equal."""
    calib = CalibData({"image": torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(4)).numpy()},
                      batch_size=8)
    sm = FoldSmoothingScales()(vit.copy(), PassContext(calib=calib))
    res = RotateHadamard()(sm.graph.copy())
    verify(res.graph)
    assert res.stats == {"ffn_down_rotated": 2, "value_out_rotated": 2, "residual_rotated": 1, "smooth_scale_folded": 3}
    assert sum(is_op(n, aten.mul) for n in res.graph.nodes) == sum(is_op(n, aten.mul) for n in sm.graph.nodes) - 3
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    _assert_equiv(vit, res, x)


def _channel_ratio(g, inputs, width):
    """max over the linears reading `width` channels (square ones, the out-projections, left out)
    of max/median of per-channel max|input|."""
    ratios = []

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            if is_op(n, aten.linear) and n.args[1].meta["val"].shape[1] == width != n.args[1].meta["val"].shape[0]:
                amax = self.env[n.args[0]].reshape(-1, width).abs().amax(0)
                ratios.append(float(amax.max() / amax.median()))
            return super().run_node(n)

    Rec(g.gm).run(*inputs)
    return max(ratios)


def test_rotation_flattens_outlier_channels(minilm, vit, rotated):
    """max/median of per-channel max|x| drops below 1/4 at the down-projection inputs (MiniLM) and at
    the LayerNorm-fed linears (ViT: qkv, fc1, head; gamma outliers)."""
    text, image = _text(4, SEQ, 2), (torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2)),)
    for g, key, x, width in ((minilm, "minilm", text, 96), (vit, "vit", image, 48)):
        assert _channel_ratio(rotated[key].graph, x, width) < _channel_ratio(g, x, width) / 4


def test_no_candidates_unchanged():
    """Linears fed by a placeholder and by a tanh are no candidates: changed False, no counts, nothing declined."""
    m = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).eval()
    g = qcompiler.trace(m, (torch.randn(2, 8),))
    res = RotateHadamard()(g)
    assert not res.changed and res.stats == {} and res.declined == []


def test_declines_shared_weight_and_odd_width():
    """A down-projection weight shared by two linears, and one of odd width 7, are declined with reasons."""

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(7, 4)

        def forward(self, x):
            h = torch.nn.functional.gelu(x)
            return self.a(h) + self.a(torch.relu(x)), self.b(torch.relu(x[:, :7]))

    g = qcompiler.trace(Bad().eval(), (torch.randn(2, 16),))
    res = RotateHadamard()(g)
    assert not res.changed
    assert sum("weight is shared" in d for d in res.declined) == 2
    assert any("width 7 has no Hadamard block > 1" in d for d in res.declined)


def test_declines_impure_value_chain():
    """A tanh between V and P @ V blocks the value/out pair, with a reason naming the op."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v, self.o = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            b, s, c = x.shape
            q, v = (p(x).reshape(b, s, 2, 8).transpose(1, 2) for p in (self.q, self.v))
            p = torch.softmax(q @ q.transpose(-2, -1), dim=-1)
            return self.o((p @ torch.tanh(v)).transpose(1, 2).reshape(b, s, c))

    g = qcompiler.trace(Attn().eval(), (torch.randn(2, 5, 16),))
    res = RotateHadamard()(g)
    assert not res.changed and res.stats == {"declined_value_out": 1}
    assert "aten.tanh between V and the out-projection" in res.declined[0]
