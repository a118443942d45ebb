"""CPU schedules for the fused kernels of an integer graph.

TVM's generic CPU pipeline leaves every fused kernel as serial, unvectorized loops (MiniLM
batch 8 x 128 took 9 s). A dlight rule (IntegerCPU) gives each kernel a plain, portable
schedule; schedules only reorder loops, so results stay bit-identical:

- elementwise blocks: a producer that one consumer reads once is inlined into it (no value
  is copied, so long integer chains such as isqrt's fix-ups, read several times, keep their
  buffers: inlined, their expression trees would grow exponentially); the innermost loop,
  where its extent is static, split by the vector width and vectorized, the loops outside it
  fused and parallel. Fusing the innermost loop with the outer ones as well would put a
  64-bit division by the symbolic extents (batch, seq) into every vector lane, which LLVM
  scalarizes (16-34 ns per element on MiniLM). A symbolic innermost loop stays a plain loop,
  which LLVM's own vectorizer takes where it can;
- matmul-like reductions (the last spatial axis has a static extent and is not reduced)
  are tiled ROWS x VEC over (rows, columns) with the reduction loop outside the tile, the
  tile accumulated in registers (cache_write "local"), the requantization epilogue computed
  at the tile, columns vectorized, row blocks parallel;
- other reductions (LayerNorm row sums, norms): parallel over their leading spatial loops.

Where the CPU has AVX2 or AVX-512 VNNI, int8 linears and attention's matmuls do not come here:
they are vnni.py's (and, with AMX, amx.py's) hand-written kernels (TVM 0.27.0.post1's tensorize
segfaults), and the softmax is rows_cpu.py's row kernel. Not done: vectorized row reductions
with a symbolic row length (LayerNorm's), tuning.
"""
from __future__ import annotations

ROWS, VEC = 4, 16


def _extent(sch, loop):
    from tvm import tirx
    e = sch.get(loop).extent
    return int(e.value) if isinstance(e, tirx.IntImm) else None


def _spatial(sch, block, vec: int = VEC):
    """Vectorize the innermost loop where its static extent allows (its lane indices then stay
    affine in the lane: fusing it with symbolic outer loops would put a 64-bit division by the
    symbolic extent into every lane, which LLVM scalarizes), parallel over the loops outside it."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = _extent(sch, loops[-1])
    outer = list(loops[:-1])
    if inner is not None and inner % vec == 0:
        io, ii = sch.split(loops[-1], [None, vec])
        sch.vectorize(ii)
        if not outer:
            outer = [io]
    elif not outer:
        outer = [loops[-1]]
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _loads(sch, consumer, buf) -> int:
    """How many times the body of block `consumer` reads buffer `buf`."""
    import re
    return len(re.findall(rf"(?<![\w.]){re.escape(buf.name)}\[", str(sch.get(consumer).body)))


def _inline_single_use(sch, blocks) -> list:
    """Inline each producer that one consumer reads once (no expression is copied, so chains such
    as isqrt's fix-ups, which read a value four times per step, stay separate blocks); returns
    the blocks left."""
    left = []
    for b in blocks:
        consumers = sch.get_consumers(b)
        if len(consumers) == 1 and _loads(sch, consumers[0], sch.get(b).writes[0].source) == 1:
            try:
                sch.compute_inline(b)
                continue
            except Exception:  # noqa: BLE001 (tvm.s_tir.ScheduleError: not inlinable here; keep the block)
                pass
        left.append(b)
    return left


def _is_dot(sch, block) -> bool:
    """A reduction of products of two different buffers (matmul, conv), not a row sum or max."""
    blk = sch.get(block)
    written = {str(w.source) for w in blk.writes}
    return len({str(r.source) for r in blk.reads} - written) >= 2


def _rule():
    from tvm import s_tir
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline

    class IntegerCPU(dl.ScheduleRule):
        def apply(self, func, target, _tunable):
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            reductions = [b for b in infos if b.is_reduction()]
            if not reductions:
                for b in _inline_single_use(sch, [b.block_rv for b in infos]):
                    _spatial(sch, b)
                return sch
            if len(reductions) == 1 and reductions[0] is infos[0] and _is_dot(sch, infos[0].block_rv):
                if self._matmul(sch, try_inline(sch, infos)):
                    return sch
                return None
            if any(not b.is_reduction() and not b.is_injective() for b in infos):
                return None
            # Row reductions (softmax, LayerNorm, norms): parallel over their leading spatial loops;
            # the elementwise blocks around them scheduled as above (producers read more than once
            # keep their buffers).
            for b in _inline_single_use(sch, [b.block_rv for b in infos]):
                loops = sch.get_loops(b)
                kinds = "".join("S" if v.iter_type == 0 else "R" for v in sch.get(b).iter_vars)
                if "R" not in kinds:
                    _spatial(sch, b)
                    continue
                n = 0
                while n < len(kinds) and kinds[n] == "S":
                    n += 1
                n = min(n, len(loops) - 1) if n == len(loops) else n
                if n:
                    sch.parallel(sch.fuse(*loops[:n]) if n > 1 else loops[0])
            return sch

        @staticmethod
        def _matmul(sch, infos) -> bool:
            main = infos[0]
            kinds = main.dom_kind()
            n_s = kinds.count("S")
            if kinds != "S" * n_s + "R" * (len(kinds) - n_s) or n_s < 2 or n_s == len(kinds):
                return False
            block = main.block_rv
            loops = sch.get_loops(block)
            col = loops[n_s - 1]
            ncol = _extent(sch, col)
            if ncol is None or ncol % VEC:
                return False
            # rows: the last leading spatial loop, blocked by ROWS where its static extent allows;
            # the loops before it stay outside (fusing them gives the tensorizer non-affine bindings)
            lead, row = loops[:n_s - 2], loops[n_s - 2]
            red = loops[n_s:]
            nrow = _extent(sch, row)
            if nrow is not None and nrow % ROWS == 0:
                ro, ri = sch.split(row, [None, ROWS])
            else:
                ro, ri = row, None
            co, ci = sch.split(col, [None, VEC])
            sch.reorder(*lead, ro, co, *red, *[ri] * (ri is not None), ci)
            acc = sch.cache_write(block, 0, "local")
            sch.reverse_compute_at(acc, co)
            for b in infos[1:]:  # the epilogue at the tile: the accumulator never leaves the cache
                sch.reverse_compute_at(b.block_rv, co)
            if len(infos) > 1:
                sch.compute_inline(acc)
            sch.parallel(sch.fuse(*lead, ro) if lead else ro)
            if ri is not None:
                sch.unroll(ri)
            sch.vectorize(ci)
            sch.decompose_reduction(block, red[0])
            return True

    return IntegerCPU()


def ScheduleCPU(target):  # noqa: N802 (a pass factory, as TVM's)
    from tvm.s_tir import dlight as dl
    return dl.ApplyDefaultSchedule(_rule())
