"""RotateHadamard: QuaRot-style orthogonal rotations folded into weights (Ashkboos et al. 2024).

For any orthogonal R (R R^T = I) a linear layer is unchanged by y = (x R)(W R)^T + b. With R a
(randomised, block-diagonal) Hadamard matrix, x R spreads each outlier channel of x evenly over
its block, so a per-tensor activation quantizer of the layer input wastes far less range
(MiniLM's FFN down-projection inputs: per-tensor int8 relative error 3.6e-2 -> 1.8e-4).

The rotation. hadamard(n) is Sylvester's H_n / sqrt(n) for n a power of two. A width C that is
not a power of two uses the largest power-of-two block n dividing C (C & -C: 1536 = 3 x 512,
192 = 3 x 64, 24 = 3 x 8); width with no block > 1 (odd C) is declined. Each block is
    R_n = (D_a H_a) kron (D_b H_b),   n = a b,  a = 2^floor(log2(n) / 2),
with D_a, D_b seeded random +-1 diagonals (QuaRot's random signs): a plain Hadamard maps the
mean of a non-negative-ish activation (GELU outputs) into coordinate 0 of each block and makes a
new outlier there (MiniLM layer 5: max/median channel 3.6 with plain H, 2.1 with signs), and
Kronecker-structured signs keep the online rotation factorable. R = blockdiag(R_n, ..., R_n).

Placements (each found by matching the ATen graph):
(a) FFN down-projection, linear(act(h), W, b) with act in gelu / relu / silu (optionally through
    a per-channel constant mul, SmoothQuant's explicit scale). act is not linear, so x R has to
    be computed online. It is inserted in front of the linear with ATen ops only:
        u = unflatten(x, -1, [C/n, a, b]);  u = matmul(u, D_b H_b);  u = matmul(H_a D_a, u)
        x R = flatten(u, -3, -1)          (X [a, b] per block:  vec(X) R_n = vec(A^T X B))
    and W <- W R. The two matmuls by constant +-1/sqrt(k) matrices are named hadamard_* so a
    quantizer can keep them in float the way QuaRot runs its online Hadamard in fp16:
    Config(exclude=("hadamard_*",)). Quantized (the default op set includes matmul), their
    input is the un-rotated activation at per-tensor int8 again. Real MiniLM, 64 calibration /
    128 evaluation sentences, embedding cosine vs FP32 mean / min, torch fake-quant graph:
    W8A8 smooth 0.9971 / 0.9919, smooth + rotate 0.9974 / 0.9881 (hadamard_* quantized),
    0.9987 / 0.9949 (hadamard_* in float); W4A8 smooth 0.8241 / 0.6994, smooth + rotate
    0.8607 / 0.7610 (quantized), 0.8631 / 0.7559 (in float); the transformer recipe keeps them
    in float for that (qcompiler/config.py). The ONNX backend has no Hadamard-specific handling:
    kept in float they export as plain MatMuls; quantized, like any matmul with a quantized
    constant operand (the constant as integer initializer -> DequantizeLinear), and ORT matches
    the fake-quant graph at float32 tolerance (tests/backends/test_onnx_backend.py,
    test_rotated_ffn_matches_fake_quant). An earlier ONNX score of the quantized-hadamard W8A8
    artifact, 0.5826 / 0.2683, was ORT's fused int8 kernels on x86 without VNNI saturating their
    int16 pair sums on the Hadamard's all +-127 codes, not the export; OnnxRunner runs only ORT's
    basic optimizations there (backends/onnx.py, fused_int8_is_exact). Speed on CPU at
    MiniLM's shape x [8, 128, 1536], 2 threads (medians): this two-matmul Kronecker form
    2.5 ms, one dense [512, 512] block matmul 12.3 ms,
    a 9-stage fast Walsh-Hadamard in ATen (reshape / add / sub / stack) 20.3 ms, the down-
    projection itself 8.7 ms; so the Kronecker form is what is inserted.
(b) value / output projection per head. V = x W_v^T + b_v, split into heads of hd channels,
    out = concat_h(P_h V_h) W_o^T + b_o. With a per-head orthogonal R (hd x hd, as above):
        W_v[head h rows] <- R^T W_v[head h rows],  b_v[head h] <- R^T b_v[head h],
        W_o[:, head h columns] <- W_o[:, head h columns] R,
    exact since P_h (V_h R) R^T = P_h V_h; nothing is computed online. The chain from V to the
    out-projection must be a pure per-head reshape / transpose / permute / unbind-getitem /
    matmul(P, V) chain, checked by tracking which axis holds heads and head channels: MiniLM's
    separate value linear (reshape [B, S, H, hd], transpose) and a fused qkv linear (reshape
    [B, N, 3, H, hd], permute, unbind; only the V third of W_qkv's rows is rotated) both match.
    A per-channel constant mul right before the out-projection (SmoothQuant's explicit 1/s) does
    not commute with a per-head rotation, so it is folded into W_o's columns first (counted as
    smooth_scale_folded): the rotation then takes over outlier handling for that input.
(c) the residual stream of a pre-LN network (FashionViT). LayerNorm(x R) = LayerNorm(x) R needs
    mean(x R) = mean(x) and the centring to commute with R, which holds exactly when R 1 = 1
    (then R^T 1 = 1 too, R being orthogonal; the variance is kept since R is). A Hadamard has
    H 1 = sqrt(n) e_1 and does not qualify; H D H with a random +-1 diagonal D, D_00 = +1, does
    (H D H 1 = H D sqrt(n) e_1 = 1) and mixes like a randomised Hadamard; blockdiag keeps it.
    The stream is found from the LayerNorm inputs, grown through residual adds; it may feed only
    LayerNorms and adds. Every writer's output channels rotate: linear rows W <- R^T W, b <- b R;
    conv output channels likewise; constants (cls token, position table, embedding tables) c R,
    followed back through transpose / flatten / expand / slice / select / cat / embedding / add.
    Every LayerNorm reader loses its affine (gamma = 1, beta = 0), which moves into the linears
    it feeds (through slice / select on other axes and per-channel constant muls):
        W <- W diag(gamma) R,  b <- b + W beta,
    so the qkv / fc1 / head inputs become LN(x) R: gamma's outlier channels (and SmoothQuant's
    scales folded into gamma) are replaced by the rotation.
Not supported, and why. In a post-LN network (BERT / MiniLM) the stream is a LayerNorm output:
(gamma u + beta) R is not an elementwise affine of u R unless gamma is uniform, and that value
feeds the next residual add and LayerNorm directly, with no linear to absorb R^T diag(gamma) R;
so the residual rotation is not exact there, and the pass declines it, naming the LayerNorm. A
LayerNorm whose output reaches anything but a linear (its affine cannot be absorbed), a stream
value used by anything but LayerNorms and adds, and a writer that cannot absorb R (a placeholder,
a non-linear op) decline (c) the same way; (a) and (b) are independent of it.

Numerics TOLERANT: exact in real arithmetic; in fp32, W R is formed in float64 and rounded once,
and each online rotated value costs a + b extra products (<= 2 sqrt(n) + 1), so outputs agree
with the original graph to within 1e-5 of each output's max-abs (tested, with x50 outlier
channels; measured about 1e-6 on the small models in tests/passes/test_rotate.py).
"""
from __future__ import annotations

import math
import operator
from collections import Counter

import torch
import torch.fx as fx

from qcompiler.errors import QCError
from qcompiler.ir import Graph, eliminate_dead_code, is_const, is_op, is_private_const, op_name
from qcompiler.pipeline import TOLERANT, Pass, PassContext, PassResult, register

aten = torch.ops.aten
_ACTS = (aten.gelu, aten.relu, aten.silu)  # non-linear producers: the rotation must be online
_VIEWS = (aten.reshape, aten.view, aten._unsafe_view)
_SAME = (aten.clone, aten.contiguous, aten.alias)


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester's Hadamard matrix H_n / sqrt(n): symmetric, orthonormal, entries +-1/sqrt(n)."""
    if n < 1 or n & (n - 1):
        raise QCError(f"hadamard({n}): the Sylvester construction needs a power of two")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard_block(width: int) -> int:
    """The largest power of two dividing `width` (the block size of block_hadamard)."""
    return width & -width


def block_hadamard(width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """blockdiag(H_n, ..., H_n) [width, width] with n = hadamard_block(width)."""
    n = hadamard_block(width)
    return torch.block_diag(*[hadamard(n, dtype)] * (width // n))


def rotation_factors(width: int, gen: torch.Generator) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(blocks, A, B): the rotation of the module docstring is blockdiag(kron(A, B)) with
    A = D_a H_a [a, a], B = D_b H_b [b, b], a * b = hadamard_block(width), seeded random signs."""
    n = hadamard_block(width)
    a = 1 << (n.bit_length() - 1) // 2
    b = n // a

    def signed(k: int) -> torch.Tensor:  # diag(D) H_k with random signs D (none for k = 1)
        d = torch.randint(0, 2, (k, 1), generator=gen).double() * 2 - 1 if k > 1 else torch.ones(1, 1, dtype=torch.float64)
        return d * hadamard(k)

    return width // n, signed(a), signed(b)


def rotation(width: int, gen: torch.Generator) -> torch.Tensor:
    """The dense orthogonal [width, width] rotation made of rotation_factors(width, gen)."""
    nb, a, b = rotation_factors(width, gen)
    return torch.block_diag(*[torch.kron(a, b)] * nb)


def _shape(node: fx.Node) -> tuple:
    return tuple(node.meta["val"].shape)


def _same_dims(a, b) -> bool:
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def _bias(lin: fx.Node):
    return lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")


class _Heads:
    """What the value chain showed: the V linear, which third of its rows (part), heads x head_dim."""

    def __init__(self, lin_v, part, nparts, heads, hd):
        self.lin_v, self.part, self.nparts, self.heads, self.hd = lin_v, part, nparts, heads, hd


def _head_layout(chain: list[fx.Node]) -> tuple[_Heads | None, str | None]:
    """Follow `chain` (V linear first, out-projection input last) tracking axis labels:
    "ch" (unsplit channels), "part" (q/k/v selector), "head", "hd" (head channels), "merged"."""
    lin_v, rest = chain[0], chain[1:]
    labels: list = [None] * (len(_shape(lin_v)) - 1) + ["ch"]
    nparts, part, heads, hd = 1, 0, None, None
    i = 0
    while i < len(rest):
        n = rest[i]
        if is_op(n, *_VIEWS):
            ish, osh = _shape(n.args[0]), _shape(n)
            if labels[-1] == "ch":
                k = len(osh) - len(ish) + 1
                tail = osh[len(ish) - 1:]
                if k not in (2, 3) or not _same_dims(ish[:-1], osh[:len(ish) - 1]) or \
                        not all(isinstance(d, int) for d in tail) or math.prod(tail) != ish[-1]:
                    return None, f"{n.name}: reshape {list(ish)} -> {list(osh)} does not split channels into heads"
                *p, heads, hd = tail
                nparts = p[0] if p else 1
                labels = [None] * (len(ish) - 1) + ["part"] * len(p) + ["head", "hd"]
            elif labels[-2:] == ["head", "hd"] and "part" not in labels and i == len(rest) - 1 \
                    and _same_dims(ish[:-2], osh[:-1]) and osh[-1] == heads * hd:
                labels = [None] * (len(osh) - 1) + ["merged"]
            else:
                return None, f"{n.name}: reshape {list(ish)} -> {list(osh)} is not a split or merge of whole heads"
        elif is_op(n, aten.transpose, aten.permute):
            r = len(labels)
            if is_op(n, aten.transpose):
                d0, d1 = (int(d) % r for d in n.args[1:3])
                order = list(range(r))
                order[d0], order[d1] = d1, d0
            else:
                order = [int(d) % r for d in n.args[1]]
            new = [labels[d] for d in order]
            if new[-1] != labels[-1]:
                return None, f"{n.name}: {op_name(n)} moves the head channels off the last axis"
            labels = new
        elif is_op(n, aten.unbind, aten.select):
            dim = int(n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % len(labels)
            if labels[dim] != "part":
                return None, f"{n.name}: {op_name(n)} along an axis that does not select q/k/v"
            if is_op(n, aten.unbind):
                i += 1
                part = int(rest[i].args[1])
            else:
                part = int(n.args[2]) % nparts
            labels.pop(dim)
        elif is_op(n, aten.matmul):
            if n.args[0] in chain:
                return None, f"{n.name}: the attention probabilities depend on V"
            if labels[-1] != "hd" or labels[-2] is not None or "part" in labels:
                return None, f"{n.name}: matmul contracts over heads or head channels of V"
            r = max(len(_shape(n.args[0])), len(labels))
            labels = [None] * (r - len(labels)) + labels[:-2] + [None, "hd"]
        elif not is_op(n, *_SAME):
            return None, f"{n.name}: {op_name(n)} between V and the out-projection is not a per-head " \
                         "reshape/permute/matmul-with-probabilities chain"
        i += 1
    if labels[-1] != "merged":
        return None, f"{chain[-1].name}: V reaches the out-projection without its heads merged back"
    return _Heads(lin_v, part, nparts, heads, hd), None


@register
class RotateHadamard(Pass):
    """Fold (randomised, block-diagonal) Hadamard rotations into FFN down-projections (online
    input rotation), value/out-projection pairs per head and a pre-LN residual stream (offline)."""

    name = "rotate"
    numerics = TOLERANT
    provides = ("rotated",)
    seed = 0

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if "rotated" in graph.meta.get("facts", []):
            return PassResult(graph, False, {}, ["graph: already rotated (rotate is not applied twice)"])
        stats: Counter = Counter()
        declined: list[str] = []
        gen = torch.Generator().manual_seed(self.seed)
        done, folded, why = self._residual(graph, gen)
        if why:
            declined.append(f"residual stream: {why}")
            stats["declined_residual"] += 1
        stats["residual_rotated"] += done
        stats["smooth_scale_folded"] += folded
        for lin in [n for n in graph.nodes if is_op(n, aten.linear)]:
            kind, plan, why = self._match(graph, lin)
            if why:
                declined.append(f"{lin.name}: {why}")
                stats[f"declined_{kind}"] += 1
            elif kind == "ffn_down":
                self._rotate_ffn(graph, lin, gen)
                stats["ffn_down_rotated"] += 1
            elif kind == "value_out":
                stats["smooth_scale_folded"] += self._rotate_heads(graph, lin, plan, gen)
                stats["value_out_rotated"] += 1
        changed = any(v for k, v in stats.items() if not k.startswith("declined_"))
        if changed:
            eliminate_dead_code(graph)
            graph.recompile()
        return PassResult(graph, changed, {k: v for k, v in stats.items() if v}, declined)

    # -- matching -------------------------------------------------------------------------

    def _match(self, graph: Graph, lin: fx.Node):
        """(placement, plan, reason declined); placement None when `lin` is no candidate."""
        x = lin.args[0]
        src = x.args[0] if is_op(x, aten.mul) and is_const(x.args[1]) else x
        if isinstance(src, fx.Node) and is_op(src, *_ACTS):
            return "ffn_down", None, self._check_weight(graph, lin, "ffn_down")
        plan, why = self._value_chain(graph, lin)
        if plan is None and why is None:
            return None, None, None
        if why is None:
            why = self._check_weight(graph, lin, "value_out") or self._check_weight(graph, plan.lin_v, "value_out")
            if why is None and hadamard_block(plan.hd) == 1:
                why = f"head dim {plan.hd} has no Hadamard block > 1"
        return "value_out", plan, why

    @staticmethod
    def _check_weight(graph: Graph, lin: fx.Node, kind: str) -> str | None:
        w, b = lin.args[1], _bias(lin)
        if not is_const(w) or graph.attr(w).dim() != 2:
            return f"{lin.name} weight is not a constant matrix"
        if len(w.users) > 1:
            return f"{lin.name} weight is shared with other ops"
        if b is not None and not is_private_const(b):
            return f"{lin.name} bias is not a constant used only there"
        width = graph.attr(w).shape[1]
        if kind == "ffn_down" and hadamard_block(width) == 1:
            return f"width {width} has no Hadamard block > 1"
        return None

    @staticmethod
    def _value_chain(graph: Graph, o: fx.Node) -> tuple[_Heads | None, str | None]:
        """Walk back from the out-projection input to the V linear; (None, None) when the
        input does not come from an activation @ V matmul at all."""
        z = o.args[0]
        scale = None
        if is_op(z, aten.mul) and is_const(z.args[1]):
            scale, z = z, z.args[0]
        chain, cur, seen_matmul = [], z, False
        while isinstance(cur, fx.Node) and not is_op(cur, aten.linear):
            if is_op(cur, aten.matmul) and not is_const(cur.args[1]) and isinstance(cur.args[1], fx.Node):
                nxt, seen_matmul = cur.args[1], True
            elif is_op(cur, *_VIEWS, aten.transpose, aten.permute, aten.select, aten.unbind, *_SAME):
                nxt = cur.args[0]
            elif cur.op == "call_function" and cur.target is operator.getitem and is_op(cur.args[0], aten.unbind):
                nxt = cur.args[0]
            elif not seen_matmul:
                return None, None
            else:
                return None, (f"{cur.name}: {op_name(cur)} between V and the out-projection is not a per-head "
                              "reshape/permute/matmul-with-probabilities chain")
            chain.append(cur)
            cur = nxt
        if not seen_matmul:
            return None, None
        if not isinstance(cur, fx.Node):
            return None, "V is not produced by a linear"
        chain.append(cur)
        chain.reverse()
        if scale is not None:
            c, width = graph.attr(scale.args[1]), graph.attr(o.args[1]).shape[-1]
            if len(scale.users) != 1 or not is_private_const(scale.args[1]) or \
                    c.numel() not in (1, width) or (c.numel() > 1 and c.shape[-1] != width):
                return None, f"{scale.name}: the scale in front of the out-projection is not a private per-channel constant"
        if len(z.users) != 1:
            return None, f"{z.name}: the merged heads have other users than the out-projection"
        for n, nxt in zip(chain, chain[1:]):
            if is_op(n, aten.unbind):
                if any(u.target is not operator.getitem or (u is not nxt and u.args[1] == nxt.args[1]) for u in n.users):
                    return None, f"{n.name}: the unbound V part has other users"
            elif len(n.users) != 1:
                return None, f"{n.name}: V (or a view of it) has other users than the attention chain"
        return _head_layout(chain)

    # -- rewriting ------------------------------------------------------------------------

    def _rotate_ffn(self, graph: Graph, lin: fx.Node, gen: torch.Generator) -> None:
        """x -> x R online in front of `lin`, W <- W R."""
        w = graph.attr(lin.args[1])
        width = w.shape[1]
        nb, a, b = rotation_factors(width, gen)
        r = torch.kron(a, b)
        n = r.shape[0]
        w_new = (w.double().reshape(-1, nb, n) @ r).reshape(w.shape)
        self._set(graph, lin, 1, w_new.to(w.dtype))
        x = lin.args[0]
        dt = x.meta["val"].dtype if "val" in x.meta else w.dtype
        tag = f"hadamard_{lin.name}"
        g = graph.graph
        with g.inserting_before(lin):
            u = self._call(graph, aten.unflatten.int, (x, -1, [nb, a.shape[0], b.shape[0]] if a.shape[0] > 1 else [nb, n]),
                           f"{tag}_split")
            bn = graph.add_constant(b.to(dt), f"{tag}_b", before=lin)
            u = self._call(graph, aten.matmul.default, (u, bn), f"{tag}_mm_b")
            if a.shape[0] > 1:
                an = graph.add_constant(a.t().to(dt), f"{tag}_a", before=lin)
                u = self._call(graph, aten.matmul.default, (an, u), f"{tag}_mm_a")
            y = self._call(graph, aten.flatten.using_ints, (u, -3 if a.shape[0] > 1 else -2, -1), f"{tag}_merge")
        lin.replace_input_with(x, y)

    def _rotate_heads(self, graph: Graph, o: fx.Node, h: _Heads, gen: torch.Generator) -> int:
        """W_v[head rows] <- R^T W_v, b_v <- R^T b_v, W_o[:, head cols] <- W_o R; returns 1 when
        a per-channel scale in front of `o` was folded into W_o first."""
        r = rotation(h.hd, gen)
        folded = 0
        z = o.args[0]
        wo = graph.attr(o.args[1]).double()
        if is_op(z, aten.mul):
            wo = wo * graph.attr(z.args[1]).double().reshape(1, -1)
            o.replace_input_with(z, z.args[0])
            folded = 1
        wo_new = (wo.reshape(wo.shape[0], h.heads, h.hd) @ r).reshape(wo.shape)
        self._set(graph, o, 1, wo_new)
        lo, hi = h.part * h.heads * h.hd, (h.part + 1) * h.heads * h.hd
        wv = graph.attr(h.lin_v.args[1]).double().clone()
        wv[lo:hi] = (r.t() @ wv[lo:hi].reshape(h.heads, h.hd, -1)).reshape(hi - lo, -1)
        self._set(graph, h.lin_v, 1, wv)
        bv = _bias(h.lin_v)
        if bv is not None:
            bias = graph.attr(bv).double().clone()
            bias[lo:hi] = (bias[lo:hi].reshape(h.heads, h.hd) @ r).reshape(-1)
            self._set(graph, h.lin_v, 2, bias)
        return folded

    # -- (c) residual stream ----------------------------------------------------------------

    def _residual(self, graph: Graph, gen: torch.Generator) -> tuple[int, int, str | None]:
        """Rotate the residual stream of a pre-LN network: (1, scales folded, None) when done,
        (0, 0, reason) when declined, (0, 0, None) when there is no LayerNorm over the last axis."""
        lns = [n for n in graph.nodes if is_op(n, aten.layer_norm) and len(n.args[1]) == 1]
        if not lns:
            return 0, 0, None
        width = int(lns[0].args[1][0])
        if any(int(n.args[1][0]) != width for n in lns):
            return 0, 0, "LayerNorms of several widths"
        if hadamard_block(width) == 1:
            return 0, 0, f"width {width} has no Hadamard block > 1"
        stream, queue, readers = {}, [n.args[0] for n in lns], []
        while queue:
            v = queue.pop()
            if v in stream:
                continue
            stream[v] = None
            for u in v.users:
                if is_op(u, aten.layer_norm) and u.args[0] is v and u in lns:
                    readers.append(u)
                elif is_op(u, aten.add) and not u.kwargs and len(u.args) == 2:
                    queue.append(u)
                else:
                    return 0, 0, f"the stream value {v.name} feeds {u.name} ({op_name(u)}), not a LayerNorm or residual add"
        writers: list[tuple[fx.Node, int]] = []
        for v in stream:
            for a in (v.args[:2] if is_op(v, aten.add) else (v,)):
                if a not in stream or a is v:
                    why = self._writers(graph, a, len(_shape(a)) - 1, writers, top=a is v)
                    if why:
                        return 0, 0, why
        absorb: list[tuple[fx.Node, fx.Node, fx.Node | None]] = []  # (LayerNorm, linear, scale mul)
        for ln in readers:
            for u in ln.users:
                lin, scale = u, None
                while len(lin.users) == 1 and (is_op(lin, aten.slice, aten.select) and int(lin.args[1]) % len(
                        _shape(lin.args[0])) != len(_shape(lin.args[0])) - 1 or self._channel_scale(graph, lin, width)):
                    scale = lin if is_op(lin, aten.mul) else scale
                    lin = next(iter(lin.users))
                if not is_op(lin, aten.linear) or self._check_weight(graph, lin, "residual"):
                    return 0, 0, f"{ln.name}: LayerNorm output feeds {lin.name} ({op_name(lin)}), which cannot absorb its affine"
                absorb.append((ln, lin, scale))
        for ln in readers:
            for i in (2, 3):
                if ln.args[i] is not None and not is_private_const(ln.args[i]):
                    return 0, 0, f"{ln.name}: LayerNorm affine is not a constant used only there"
        r = self._mean_preserving(width, gen)
        for node, axis in writers:  # stream values x -> x R: each writer's output channels rotate
            if node.op == "get_attr":
                c = graph.attr(node).double().movedim(axis, -1)
                user = next(iter(node.users))
                new = graph.add_constant((c @ r).movedim(-1, axis).to(graph.attr(node).dtype), f"{node.name}_rot", before=user)
                user.replace_input_with(node, new)
                continue
            w = graph.attr(node.args[1]).double()
            self._set(graph, node, 1, (r.t() @ w.reshape(width, -1)).reshape(w.shape))
            if _bias(node) is not None:
                self._set(graph, node, 2, graph.attr(_bias(node)).double() @ r)
        for ln, lin, scale in absorb:  # y = (gamma u + beta) W^T + b  ->  (u R)(W diag(gamma) R)^T + (b + W beta)
            w = graph.attr(lin.args[1]).double()
            if scale is not None:  # a per-channel scale on the way (SmoothQuant's 1/s): into W first
                w = w * graph.attr(scale.args[1]).double().reshape(1, -1)
                scale.replace_all_uses_with(scale.args[0])
            gamma = graph.attr(ln.args[2]).double() if ln.args[2] is not None else torch.ones(width, dtype=w.dtype)
            beta = graph.attr(ln.args[3]).double() if ln.args[3] is not None else torch.zeros(width, dtype=w.dtype)
            bias = graph.attr(_bias(lin)).double() if _bias(lin) is not None else torch.zeros(w.shape[0], dtype=w.dtype)
            self._set(graph, lin, 1, (w * gamma) @ r)
            if _bias(lin) is not None:
                self._set(graph, lin, 2, bias + w @ beta)
            else:
                args = list(lin.args) + [None] * (3 - len(lin.args))
                args[2] = graph.add_constant((bias + w @ beta).to(graph.attr(lin.args[1]).dtype), f"{lin.name}_bias_rot", before=lin)
                lin.args, lin.kwargs = tuple(args), {}
        for ln in readers:
            dt = ln.meta["val"].dtype if "val" in ln.meta else torch.float32
            args = list(ln.args) + [None] * max(0, 4 - len(ln.args))
            args[2] = graph.add_constant(torch.ones(width, dtype=dt), f"{ln.name}_weight_rot", before=ln)
            args[3] = graph.add_constant(torch.zeros(width, dtype=dt), f"{ln.name}_bias_rot", before=ln)
            ln.args = tuple(args)
        return 1, sum(sc is not None for _, _, sc in absorb), None

    def _writers(self, graph: Graph, a, axis: int, out: list, top: bool = False) -> str | None:
        """Collect (node, channel axis) of the ops that can rotate `a`'s channel axis `axis`
        (`top`: `a` is itself a stream value, whose users were checked already)."""
        if not isinstance(a, fx.Node):
            return "a residual add has a scalar operand"
        if is_op(a, aten.layer_norm):
            return f"the stream is written by LayerNorm {a.name} (post-LN): its affine does not commute with a rotation"
        if len(a.users) != 1 and not top:
            return f"{a.name} writes the residual stream and has other users"
        if a.op == "get_attr":
            out.append((a, axis))
            return None
        rank = len(_shape(a))
        if is_op(a, aten.linear) and axis == rank - 1 or is_op(a, aten.conv1d, aten.conv2d, aten.conv3d) and axis == 1:
            why = self._check_weight(graph, a, "residual") if is_op(a, aten.linear) else \
                None if is_private_const(a.args[1]) and (_bias(a) is None or is_private_const(_bias(a))) else f"{a.name} weight is shared"
            if why:
                return why
            out.append((a, axis))
            return None
        if is_op(a, aten.transpose):
            d0, d1 = (int(d) % rank for d in a.args[1:3])
            return self._writers(graph, a.args[0], d1 if axis == d0 else d0 if axis == d1 else axis, out)
        if is_op(a, aten.flatten):
            r0 = len(_shape(a.args[0]))
            start = int(a.args[1]) % r0 if len(a.args) > 1 else 0
            end = int(a.args[2]) % r0 if len(a.args) > 2 else r0 - 1
            if start <= axis and (axis > start or end > start):
                if axis == start:
                    return f"{a.name}: flatten merges the channel axis with others"
                axis += end - start
            return self._writers(graph, a.args[0], axis, out)
        if is_op(a, aten.expand, aten.clone, aten.contiguous):
            return self._writers(graph, a.args[0], axis, out)
        if is_op(a, aten.slice) and int(a.args[1]) % rank != axis:
            return self._writers(graph, a.args[0], axis, out)
        if is_op(a, aten.select):
            d = int(a.args[1]) % (rank + 1)
            return self._writers(graph, a.args[0], axis + (d <= axis), out)
        if is_op(a, aten.embedding) and axis == rank - 1:
            return self._writers(graph, a.args[0], 1, out)
        if is_op(a, aten.cat) and int(a.args[1] if len(a.args) > 1 else 0) % rank != axis:
            return next((w for w in (self._writers(graph, p, axis, out) for p in a.args[0]) if w), None)
        if is_op(a, aten.add) and not a.kwargs:
            return next((w for w in (self._writers(graph, p, axis - rank + len(_shape(p)) if isinstance(p, fx.Node) else 0, out)
                                     for p in a.args[:2]) if w), None)
        return f"{a.name} ({op_name(a)}) writes the residual stream and cannot absorb a rotation"

    @staticmethod
    def _channel_scale(graph: Graph, n: fx.Node, width: int) -> bool:
        """True for mul(x, c) with c a private constant of `width` channels on the last axis."""
        if not (is_op(n, aten.mul) and is_private_const(n.args[1])):
            return False
        c = graph.attr(n.args[1])
        return c.numel() == width and c.shape[-1] == width

    @staticmethod
    def _mean_preserving(width: int, gen: torch.Generator) -> torch.Tensor:
        """blockdiag(H D H) with random +-1 signs D, D_00 = +1: orthogonal and R 1 = 1, so it
        commutes with LayerNorm's centring; it mixes like a randomised Hadamard."""
        n = hadamard_block(width)
        h = hadamard(n)
        d = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
        d[0] = 1
        return torch.block_diag(*[h @ torch.diag(d) @ h] * (width // n))

    @staticmethod
    def _call(graph: Graph, target, args, name: str) -> fx.Node:
        """Insert a call with a recorded fake value (propagated from its inputs' values)."""
        node = graph.graph.create_node("call_function", target, args, name=name)
        vals = [a.meta.get("val") for a in node.all_input_nodes]
        if all(isinstance(v, torch.Tensor) for v in vals):
            from torch._guards import detect_fake_mode
            mode = detect_fake_mode(vals)
            if mode is not None:
                env = {a: (mode.from_tensor(graph.attr(a), static_shapes=True) if a.op == "get_attr" else a.meta["val"])
                       for a in node.all_input_nodes}
                with mode:
                    node.meta["val"] = target(*fx.node.map_arg(args, env.__getitem__))
        return node

    @staticmethod
    def _set(graph: Graph, op: fx.Node, i: int, value: torch.Tensor) -> None:
        old = op.args[i] if i < len(op.args) else op.kwargs["bias"]
        new = graph.add_constant(value.to(graph.attr(old).dtype), f"{op.name}_{old.name}_rot", before=op)
        op.replace_input_with(old, new)
