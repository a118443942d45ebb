"""The Relax pipeline of the TVM backends: TVM's own stages (legalize, fuse, lower, plan
memory), with qcompiler's schedules in place of the defaults where those are wrong for
integer graphs.

- CPU: TVM's generic CPU pipeline leaves every loop nest serial and unscheduled. The
  schedule rules in schedule_cpu.py parallelize and vectorize each fused kernel.
- CUDA: dlight's default GPU rules, except that int8 matmuls are marked
  `dlight.do_not_tensorize`: the int8 tensor-core rule (MatmulInt8Tensorization) of
  apache-tvm 0.27.0.post1 segfaults at schedule time; the marked kernels get dlight's scalar
  int32 schedule. dlight's GEMV rule asserts (instead of declining) on a row reduction whose
  operands share every spatial index (the sum of d^2 in LayerNorm, d computed from x and the
  row sum); it declines there instead, and the reduction rules take the kernel.
"""
from __future__ import annotations


def _mark_int8_matmuls(mod):
    import tvm
    from tvm import tirx
    out = {}
    for gv, f in mod.functions.items():
        if isinstance(f, tirx.PrimFunc) and any(str(getattr(v.ty, "dtype", "")) in ("int8", "uint8") for v in f.params):
            f = f.with_attr("dlight.do_not_tensorize", True)
        out[gv] = f
    return tvm.IRModule(out, attrs=mod.attrs)


def _gemv_rule():
    from tvm.s_tir import dlight as dl

    class GEMV(dl.gpu.GEMV):
        def apply(self, func, target, tunable):
            try:
                return super().apply(func, target, tunable)
            except AssertionError:  # dlight.analysis.gemv.normalize: `assert s_loops` (no spatial loop)
                return None
    return GEMV()


def pipeline(target):
    import tvm
    from tvm import relax

    def passes():
        # dead bindings: views whose reader a fused kernel replaced (fuse_attention.py)
        lib = [relax.transform.DeadCodeElimination(["main"]), relax.backend.DispatchSampling(),
               relax.backend.DispatchSortScan()]
        legal = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
                 relax.transform.FuseOps(), relax.transform.FuseTIR()]
        if target.kind.name == "cuda":
            from tvm.s_tir import dlight as dl
            sched = [tvm.transform.module_pass(lambda m, _c: _mark_int8_matmuls(m), opt_level=0, name="MarkInt8"),
                     dl.ApplyDefaultSchedule(dl.gpu.Matmul(), _gemv_rule(), dl.gpu.Reduction(),
                                             dl.gpu.GeneralReduction(), dl.gpu.Fallback())]
            final_extra = [relax.transform.RewriteCUDAGraph()]
        else:
            from .schedule_cpu import ScheduleCPU
            sched = [ScheduleCPU(target)]
            final_extra = []
        lower = [relax.transform.RewriteDataflowReshape(), relax.transform.ToNonDataflow(),
                 relax.transform.RemovePurityChecking(), relax.transform.CallTIRRewrite()]
        final = [relax.transform.StaticPlanBlockMemory(), *final_extra, relax.transform.LowerAllocTensor(),
                 relax.transform.KillAfterLastUse(), relax.transform.LowerRuntimeBuiltin(),
                 relax.transform.ComputePrimValue(), relax.transform.VMShapeLower(),
                 relax.transform.AttachGlobalSymbol()]
        return lib + legal + sched + lower + final

    @tvm.transform.module_pass(opt_level=0, name="QCompilerPipeline")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes())(mod)

    return _pipeline
