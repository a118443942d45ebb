"""Measured per-layer latency: the table the mixed-precision ILP reads for its latency budget.

profile_layers(graph, target, configs) finds every weighted layer, and for each distinct
(op, weight shape, input shape, configuration) builds a one-layer model with that layer's
weight, bias and attributes, runs it on the layer's real input (recorded by running the
model on the given inputs: batch dims come from them) and times it on the target:

- "onnx-cpu": torch module -> qcompiler IR -> annotate / calibrate / fake-quant at the
  configuration -> ONNX QDQ by backends.onnx.emit -> OnnxRunner (ONNX Runtime CPU, graph
  optimizations on, so QDQ fuses into its integer kernels); "float" is the float ONNX export.
  4-bit weights are stored as int8 (values in [-7, 7]) so that ORT runs its int8 kernels:
  the table's W4 entries cost what an int8 kernel costs.
- "tvm-llvm": qcompiler's own integer-only tvm-llvm artifact of the one-layer model, compiled
  and loaded as a user's would be (no "float" configuration: the TVM backend is integer-only).
- "torch-cuda": int8 GEMM on the GPU's tensor cores, torch._int_mm on the activation
  quantized per tensor and the int8 weight, int32 accumulator dequantized to bf16 (w8a8);
  W4 weights are stored packed two per byte and unpacked to int8 before the MMA in every call
  (Hopper has no int4 MMA); "float" is bf16. 16-bit activations have no integer MMA there.

Timing: warm-up, then `repeats` rounds that run every entry once in turn (interleaved, so
drift hits all entries alike; a new random order each round, and an untimed call before each
sample, so that no entry is always measured after the same, possibly much larger, one); each
sample runs an entry enough times to last min_sample_ms; an entry's latency is the median of
its samples, in milliseconds.

Keys are those AssignBitWidths looks up (passes.mixed_precision.latency_key):
"<op>:<weight shape>:<config>", with the input shape appended only where one model holds
the same (op, weight shape) at several input shapes. A backend plugs in with @register_timer.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx

from .calib import CalibData
from .config import Config
from .errors import QCError
from .ir import QMETA, Graph

FORMAT = "qcompiler-latency-table"
TIMERS: dict[str, type["Timer"]] = {}


def register_timer(name: str):
    """Class decorator: make a Timer available as `timer(name)` and `qcompiler profile --target name`."""
    def deco(cls):
        cls.target = name
        TIMERS[name] = cls
        return cls
    return deco


def timer(target: str, **options) -> "Timer":
    """The registered timer for `target`, built with its options (onnx-cpu: threads)."""
    if target not in TIMERS:
        raise QCError(f"no latency timer for target '{target}' (choose from {', '.join(TIMERS)})")
    return TIMERS[target](**options)


def parse_config(cfg: str) -> tuple[int | None, int | None]:
    """'w4a8' -> (4, 8), 'w8' -> (8, None), 'float' -> (None, None)."""
    if cfg == "float":
        return None, None
    try:
        w, _, a = cfg[1:].partition("a")
        if not cfg.startswith("w"):
            raise ValueError
        return int(w), (int(a) if a else None)
    except ValueError:
        raise QCError(f"bad configuration '{cfg}' (expected w<bits>a<bits>, w<bits> or float)") from None


@dataclass
class LayerCase:
    """One entry to time: a layer's call (target, args with the input at `input_index`) at a config."""

    key: str
    op: str
    config: str
    target: Callable
    args: tuple  # tensors (weight, bias) and constants; the input's slot holds None
    kwargs: dict
    input_index: int
    weight_index: int
    x: torch.Tensor  # the layer's real input (first layer of the model with this key)
    has_act: bool  # the input is a quantizable float activation (False: embedding indices)

    @property
    def weight(self) -> torch.Tensor:
        return self.args[self.weight_index]


class OneLayer(torch.nn.Module):
    """`target(*args)` with the layer input in its slot and tensors as buffers."""

    def __init__(self, case: LayerCase):
        super().__init__()
        self.target, self.kwargs, self.input_index = case.target, dict(case.kwargs), case.input_index
        self.slots = []
        for j, a in enumerate(case.args):
            if isinstance(a, torch.Tensor):
                self.register_buffer(f"t{j}", a.detach().clone())
                self.slots.append(("t", f"t{j}"))
            else:
                self.slots.append(("c", a))

    def forward(self, x):
        args = [x if j == self.input_index else getattr(self, v) if k == "t" else v
                for j, (k, v) in enumerate(self.slots)]
        return self.target(*args, **self.kwargs)


class Timer:
    """Builds a runnable for a LayerCase on one target and times runnables."""

    target = ""
    notes = ""

    def describe(self) -> dict:
        return {"target": self.target, "device": cpu_model(), "notes": self.notes,
                "torch": torch.__version__.split("+")[0]}

    def prepare(self, case: LayerCase) -> Callable[[], Any]:
        """A callable that runs the case once on the target."""
        raise NotImplementedError

    def prepare_all(self, cases: Sequence[LayerCase]) -> dict[str, Callable[[], Any]]:
        return {c.key: self.prepare(c) for c in cases}

    def sample(self, fn: Callable[[], Any], number: int) -> float:
        """Milliseconds per call over `number` back-to-back calls."""
        t = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t) * 1e3 / number


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


@register_timer("onnx-cpu")
class OnnxCpuTimer(Timer):
    notes = ("ONNX Runtime CPUExecutionProvider, default graph optimizations and threads; QDQ one-layer models "
             "exported by qcompiler's ONNX backend; W4 weights stored as int8 (values in [-7, 7]) so ORT runs its "
             "int8 kernels: W4 costs what int8 costs here; 'float' is the float32 export")

    def __init__(self, threads: int | None = None):
        self.threads = threads  # intra-op threads; None: ORT's default, as OnnxRunner (and artifacts) run

    def describe(self) -> dict:
        import onnxruntime as ort
        return {**super().describe(), "onnxruntime": ort.__version__,
                "threads": self.threads or "ORT default (intra-op: physical cores)"}

    def _runner(self, model: bytes):
        from .backends.onnx import OnnxRunner
        if self.threads is None:
            return OnnxRunner(model)
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = self.threads, 1
        r = OnnxRunner.__new__(OnnxRunner)  # OnnxRunner's session, with a thread count
        r.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        r.input_names = [i.name for i in r.session.get_inputs()]
        r.output_names = [o.name for o in r.session.get_outputs()]
        return r

    def prepare_all(self, cases: Sequence[LayerCase]) -> dict[str, Callable[[], Any]]:
        """Few exports: the cases are side-by-side branches of one model (input x<i> -> output y<i>),
        each annotated at its own widths (float: not annotated), calibrated and fake-quantized on
        its own; each branch is then cut out into a model of its own (onnx.utils.Extractor) with
        its own session. Cases with 16-bit activations go into a second model (ONNX opset 21),
        so the rest can go back to opset 20 once W4 is stored as int8."""
        import onnx

        from .backends import onnx as onnx_backend
        from .passes.quantize import layers
        from .pipeline import PassContext, PassManager

        out = {}
        wide = [c for c in cases if (parse_config(c.config)[1] or 8) > 8]
        for group in ([c for c in cases if c not in wide], wide):
            if not group:
                continue
            g = PassManager(["annotate"]).run(_trace_cases(group), PassContext(config=Config(pre_passes=())))
            nodes = layers(g)
            if len(nodes) != len(group):
                raise QCError(f"profiling model has {len(nodes)} quantizable layers for {len(group)} cases")
            for n, c in zip(nodes, group):
                w_bits, a_bits = parse_config(c.config)
                if w_bits is None:
                    del n.meta[QMETA]
                    continue
                for q in n.meta[QMETA]["inputs"].values():
                    q["spec"] = q["spec"].with_(bits=w_bits if q["role"] == "weight" else a_bits or 8)
            calib = CalibData({f"x{i}": c.x.numpy() for i, c in enumerate(group)}, batch_size=len(group[0].x))
            g = PassManager(["calibrate", "fake_quant"]).run(g, PassContext(config=Config(), calib=calib))
            model = int4_weights_as_int8(onnx_backend.emit(g)["model.onnx"])
            ex = onnx.utils.Extractor(onnx.load_from_string(model))
            for i, c in enumerate(group):
                runner = self._runner(ex.extract_model([f"x{i}"], [f"y{i}"]).SerializeToString())
                feeds = {f"x{i}": c.x.numpy()}
                out[c.key] = lambda r=runner, f=feeds: r.run(f)
        return out


def int4_weights_as_int8(model_bytes: bytes) -> bytes:
    """Store int4 initializers (weights and their zero points) as int8 with the same values; the
    model then needs opset 20 only, and goes back to it (Q/DQ lose their default opset-21
    attributes), which ORT's QDQ fusions handle."""
    import onnx
    from onnx import TensorProto, numpy_helper

    m = onnx.load_from_string(model_bytes)
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == TensorProto.INT4:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int8), t.name))
    for vi in m.graph.value_info:
        if vi.type.tensor_type.elem_type == TensorProto.INT4:
            vi.type.tensor_type.elem_type = TensorProto.INT8
    types = {t.data_type for t in m.graph.initializer}
    blocked = any(a.name == "block_size" and a.i > 0 for n in m.graph.node for a in n.attribute)
    if not blocked and not types & {TensorProto.UINT4, TensorProto.INT16, TensorProto.UINT16}:
        for o in m.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = min(o.version, 20)
        for n in m.graph.node:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                keep = [a for a in n.attribute if not (a.name in ("block_size", "output_dtype") and a.i == 0)]
                del n.attribute[:]
                n.attribute.extend(keep)
    return m.SerializeToString()


@register_timer("tvm-llvm")
class TvmLlvmTimer(Timer):
    """Each case compiled by qcompiler itself (`compile(..., target="tvm-llvm")`, no recipe) into
    the integer-only artifact of its one-layer model, loaded as a deployment loads it, and run on
    the layer's real input: quantize, the integer layer (the VNNI kernel for int8 linears on CPUs
    that have it), requant / dequantize. The TVM backend compiles integer graphs only, so there
    is no "float" configuration here."""

    notes = ("qcompiler's integer-only tvm-llvm artifact of each one-layer model (input quantize, integer layer, "
             "dequantize), loaded with qcompiler.load; W4 weights run the int8 kernels (W4 costs what W8 costs); no "
             "'float' configuration (the TVM backend compiles integer graphs only)")
    integer_only = True  # `qcompiler profile` leaves 'float' out of its configurations

    def __init__(self, threads: int | None = None):
        self.threads = threads  # informational: TVM's CPU runtime uses its own thread pool (all cores)
        self._dirs = []  # the artifacts' directories, alive as long as the timer (the runners map model.so)

    def describe(self) -> dict:
        import tvm
        return {**super().describe(), "tvm": tvm.__version__}

    def prepare(self, case: LayerCase) -> Callable[[], Any]:
        import tempfile

        from .compiler import compile as qc_compile
        from .compiler import load
        from .frontends.torch import trace
        w_bits, a_bits = parse_config(case.config)
        if w_bits is None:
            raise QCError(f"{case.key}: the tvm-llvm timer has no 'float' configuration (the TVM backend compiles "
                          f"integer-only graphs); profile it with integer configurations only")
        g = trace(OneLayer(case).eval(), (case.x,), input_names=["x"], dynamic=None)
        feeds = {"x": case.x.numpy()}
        cfg = Config(target="tvm-llvm", w_bits=w_bits, a_bits=a_bits or 8, recipe="none", pre_passes=(),
                     calib_batch_size=len(case.x))
        art = qc_compile(g, CalibData(feeds, batch_size=len(case.x)), config=cfg)
        d = tempfile.TemporaryDirectory(prefix="qc-latency-")
        self._dirs.append(d)
        run = load(art.save(os.path.join(d.name, "a")))
        return lambda: run(feeds)


@register_timer("torch-cuda")
class TorchCudaTimer(Timer):
    notes = ("torch eager on CUDA: w8a8 = per-tensor int8 quantization of the input + torch._int_mm (int8 tensor "
             "cores, int32 accumulator) + dequantization to bf16 with per-channel weight scales and bias; W4 weights "
             "are stored packed two per byte and unpacked to int8 in every call before the int8 MMA (no int4 MMA on "
             "Hopper), so W4 entries include the unpacking; embeddings gather int8 (or packed int4) rows and "
             "dequantize; 'float' is bf16. Times from CUDA events")

    def __init__(self):
        if not torch.cuda.is_available():
            raise QCError("the torch-cuda latency timer needs a CUDA GPU (torch.cuda.is_available() is False)")
        self.dev = torch.device("cuda")

    def describe(self) -> dict:
        p = torch.cuda.get_device_properties(self.dev)
        return {**super().describe(), "device": f"{p.name} ({p.total_memory / 2**30:.0f} GiB)",
                "cuda": torch.version.cuda, "host_cpu": cpu_model()}

    def sample(self, fn, number):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / number

    def prepare(self, case: LayerCase) -> Callable[[], Any]:
        w_bits, a_bits = parse_config(case.config)
        kind = case.op.split(".")[-1]
        if a_bits is not None and a_bits != 8:
            raise QCError(f"torch-cuda has no integer MMA for {a_bits}-bit activations (configuration {case.config})")
        dev, bf = self.dev, torch.bfloat16
        w = case.weight.detach().float().to(dev)
        if kind == "embedding":
            idx = case.x.to(dev)
            if w_bits is None:
                wb = w.to(bf)
                return lambda: torch.nn.functional.embedding(idx, wb)
            q, s = _quantize_rows(w, w_bits)
            if w_bits == 4:
                packed = _pack_int4(q)
                return lambda: (_unpack_int4(packed[idx]).to(bf) * s[idx].to(bf))
            return lambda: q[idx].to(bf) * s[idx].to(bf)
        if kind != "linear":
            raise QCError(f"the torch-cuda latency timer handles linear and embedding layers, not {case.op}")
        bias = case.args[2] if len(case.args) > 2 and isinstance(case.args[2], torch.Tensor) else None
        b = None if bias is None else bias.detach().to(dev)
        x = case.x.to(dev).reshape(-1, case.x.shape[-1])
        if w_bits is None:
            xb, wb, bb = x.to(bf), w.to(bf), None if b is None else b.to(bf)
            return lambda: torch.nn.functional.linear(xb, wb, bb)
        if x.shape[0] <= 16 or x.shape[1] % 8 or w.shape[0] % 8:
            raise QCError(f"torch._int_mm needs M > 16 and K, N multiples of 8 (got M={x.shape[0]}, "
                          f"K={x.shape[1]}, N={w.shape[0]})")
        q, sw = _quantize_rows(w, w_bits)
        xb = x.to(bf)
        inv_sx = 127.0 / float(x.abs().max().clamp_min(1e-12))
        scale = (sw.reshape(-1) / inv_sx).float()
        bf32 = None if b is None else b.float()
        if w_bits == 4:
            packed = _pack_int4(q)

            def run():
                xq = torch.clamp(torch.round(xb * inv_sx), -128, 127).to(torch.int8)
                acc = torch._int_mm(xq, _unpack_int4(packed).t())
                out = acc.float() * scale
                return (out if bf32 is None else out + bf32).to(bf)
            return run
        wt = q.t()

        def run8():
            xq = torch.clamp(torch.round(xb * inv_sx), -128, 127).to(torch.int8)
            out = torch._int_mm(xq, wt).float() * scale
            return (out if bf32 is None else out + bf32).to(bf)
        return run8


def _quantize_rows(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 values in [-(2^(b-1)-1), 2^(b-1)-1] and float scales [rows, 1]."""
    qmax = 2 ** (bits - 1) - 1
    s = (w.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)
    return torch.clamp(torch.round(w / s), -qmax, qmax).to(torch.int8), s


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], last dim even -> uint8 with two nibbles per byte (low nibble first)."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack_int4: sign-extended int8, last dim doubled."""
    lo, hi = (p & 0xF).to(torch.int8), (p >> 4).to(torch.int8)
    lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


class Branches(torch.nn.Module):
    """Several one-layer models side by side: forward(x0, x1, ...) -> (layer0(x0), layer1(x1), ...)."""

    def __init__(self, cases: Sequence[LayerCase]):
        super().__init__()
        self.layers = torch.nn.ModuleList(OneLayer(c) for c in cases)

    def forward(self, *xs):  # inputs are distinct tensors: torch.export would merge aliased ones
        return tuple(m(x) for m, x in zip(self.layers, xs))


def _trace_cases(cases: Sequence[LayerCase]) -> Graph:
    from .frontends.torch import trace
    return trace(Branches(cases), tuple(c.x.clone() for c in cases), input_names=[f"x{i}" for i in range(len(cases))],
                 output_names=[f"y{i}" for i in range(len(cases))], dynamic=None)


class LatencyTable(dict):
    """{key: ms}, with `meta` (target, device, versions, date, command, per-entry details)."""

    def __init__(self, entries=(), meta: dict | None = None):
        super().__init__(entries)
        self.meta = dict(meta or {})


def _inputs(graph: Graph, inputs, calib: CalibData | None, batch: int | None) -> tuple[torch.Tensor, ...]:
    if inputs is None:
        if calib is None:
            raise QCError("profiling needs the model's inputs (example tensors or calibration data) for the layer shapes")
        n = batch or calib.batch_size
        inputs = {k: v[:n] for k, v in calib.arrays.items()}
    if isinstance(inputs, dict):
        CalibData(inputs).validate(graph.inputs)
        inputs = [inputs[s.name] for s in graph.inputs]
    return tuple(torch.as_tensor(np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v).to(s.torch_dtype())
                 for v, s in zip(inputs, graph.inputs))


class _InputRecorder(fx.Interpreter):
    """Runs a graph and keeps the first value each watched layer receives at its input slot."""

    def __init__(self, gm, watch: dict[str, int]):
        super().__init__(gm)
        self.watch, self.seen = watch, {}

    def run_node(self, n):
        if n.name in self.watch and n.name not in self.seen:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.seen[n.name] = args[self.watch[n.name]].detach().clone()
        return super().run_node(n)


def layer_cases(graph: Graph, configs: Sequence[str], *, inputs=None, calib: CalibData | None = None,
                batch: int | None = None) -> list[LayerCase]:
    """The distinct entries to time for `graph` (annotated on a copy when it is not annotated yet)."""
    from .passes.mixed_precision import latency_key, shape_str
    from .passes.quantize import layers
    from .passes.sensitivity import act_inputs, weight_input
    from .pipeline import PassContext, PassManager

    for c in configs:
        parse_config(c)
    g = graph if layers(graph) else PassManager(["annotate"]).run(graph.copy(), PassContext(config=Config()))
    nodes = [n for n in layers(g) if weight_input(n) is not None]
    if not nodes:
        raise QCError("the model has no weighted layers (linear, conv, embedding) to profile")
    slots = {}
    for n in nodes:
        acts = act_inputs(n)
        other = [i for i, a in enumerate(n.args) if isinstance(a, fx.Node) and a.op != "get_attr"]
        if acts:
            slots[n.name] = acts[0]
        elif len(other) == 1:
            slots[n.name] = other[0]
        else:
            raise QCError("cannot tell which argument is the layer's input", node=n.name, op=n.meta[QMETA]["op"])
    rec = _InputRecorder(g.gm, slots)
    with torch.no_grad():
        rec.run(*_inputs(g, inputs, calib, batch))
    patterns: dict[tuple, set] = {}
    for n in nodes:
        patterns.setdefault((n.meta[QMETA]["op"], tuple(g.attr(n.args[weight_input(n)]).shape)), set()).add(
            shape_str(n.args[slots[n.name]].meta["val"].shape))
    cases, seen = [], set()
    for n in nodes:
        op, wi, si = n.meta[QMETA]["op"], weight_input(n), slots[n.name]
        w = g.attr(n.args[wi])
        act_shape = tuple(n.args[si].meta["val"].shape)
        has_act = bool(act_inputs(n))
        for cfg in configs:
            w_bits, a_bits = parse_config(cfg)
            c = cfg if has_act or w_bits is None else f"w{w_bits}"
            several = len(patterns[(op, tuple(w.shape))]) > 1
            key = latency_key(op, w.shape, c, act_shape if several else None)
            if key in seen:
                continue
            seen.add(key)
            args = tuple(None if i == si else g.attr(a) if isinstance(a, fx.Node) and a.op == "get_attr" else a
                         for i, a in enumerate(n.args))
            if any(isinstance(a, fx.Node) for a in args):
                raise QCError("a layer argument besides its input and constants is not supported by the profiler",
                              node=n.name, op=op)
            cases.append(LayerCase(key, op, c, n.target, args, dict(n.kwargs), si, wi, rec.seen[n.name], has_act))
    return cases


def profile_layers(graph: Graph, target: str = "onnx-cpu", configs: Sequence[str] = ("w4a8", "w8a8", "float"), *,
                   inputs=None, calib: CalibData | None = None, batch: int | None = None, repeats: int = 20,
                   warmup: int = 2, min_sample_ms: float = 2.0, progress: bool = True,
                   timer_options: dict | None = None) -> LatencyTable:
    """Time every distinct (op, weight shape, input shape, config) of `graph` on `target`;
    {key: median ms} as a LatencyTable. Inputs: `inputs` (tensors in input order or arrays by
    name) or the first `batch` samples of `calib` (default: its batch size)."""
    from tqdm import tqdm

    t = timer(target, **(timer_options or {}))
    cases = layer_cases(graph, configs, inputs=inputs, calib=calib, batch=batch)
    fns = t.prepare_all(cases)
    numbers = {}
    for k, fn in fns.items():  # warm up, then pick calls per sample so a sample lasts min_sample_ms
        for _ in range(max(1, warmup)):
            fn()
        one = t.sample(fn, 1)
        numbers[k] = int(min(1000, max(1, math.ceil(min_sample_ms / max(one, 1e-6)))))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    rng = np.random.default_rng(0)
    keys = list(fns)
    for _ in tqdm(range(repeats), desc=f"time {target}", unit="round", leave=False, disable=None if progress else True):
        # a fresh order each round, and one untimed call before each sample: no entry is always
        # the one measured with the caches its (possibly much larger) predecessor left behind
        for k in (keys[i] for i in rng.permutation(len(keys))):
            fns[k]()
            samples[k].append(t.sample(fns[k], numbers[k]))
    table = LatencyTable({k: statistics.median(v) for k, v in samples.items()})
    table.meta = {**t.describe(), "configs": list(configs), "repeats": repeats, "warmup": warmup,
                  "min_sample_ms": min_sample_ms,
                  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "entries": {c.key: {"op": c.op, "config": c.config, "weight_shape": list(c.weight.shape),
                                      "input_shape": list(c.x.shape), "calls_per_sample": numbers[c.key],
                                      "spread_ms": [min(samples[c.key]), max(samples[c.key])]} for c in cases}}
    return table


def save_table(path: str | os.PathLike, table: dict, *, command: str | None = None, **meta) -> None:
    """Write {"format", "meta", "latency_ms"} JSON; `command` is how to regenerate the table."""
    m = {**getattr(table, "meta", {}), **meta}
    if command is not None:
        m["command"] = command
    doc = {"format": FORMAT, "version": 1, "meta": m, "latency_ms": {k: float(v) for k, v in sorted(table.items())}}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def load_table(path: str | os.PathLike) -> LatencyTable:
    """A table written by save_table, or a plain {key: ms} JSON object."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise QCError(f"{path}: cannot read latency table ({e})") from None
    if not isinstance(doc, dict):
        raise QCError(f"{path}: a latency table is a JSON object")
    if doc.get("format") == FORMAT:
        entries, meta = doc.get("latency_ms", {}), doc.get("meta", {})
    else:
        entries, meta = doc, {}
    bad = [k for k, v in entries.items() if not isinstance(v, (int, float))]
    if bad:
        raise QCError(f"{path}: latency entries must be numbers of ms (bad: {bad[:3]})")
    return LatencyTable({k: float(v) for k, v in entries.items()}, meta)
