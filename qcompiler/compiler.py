"""compile(): model -> passes -> calibration -> fake-quant -> backend artifact; load()."""
from __future__ import annotations

import hashlib
import os
import platform
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from . import __version__
from .artifact import FORMAT, FORMAT_VERSION, Artifact, read_artifact
from .calib import CalibData
from .config import Config
from .errors import QCError
from .ir import QMETA, Graph, TensorSpec, op_name
from .pipeline import PassContext, PassManager


def load_model(model: Any, example_inputs: Sequence[torch.Tensor] | None = None, **trace_kw) -> Graph:
    """A Graph from a Graph, an nn.Module (with example inputs), a .onnx or a .pt2 file,
    or 'zoo:NAME' (a bundled model)."""
    if isinstance(model, Graph):
        return model
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise QCError("tracing an nn.Module needs example_inputs")
        from .frontends.torch import trace
        return trace(model, example_inputs, **trace_kw)
    path = os.fspath(model)
    if path.startswith("zoo:"):
        from .frontends.torch import trace
        from .models import zoo
        z = zoo.get(path[4:])
        g = trace(z.module, z.example_inputs, input_names=z.input_names, dynamic=z.dynamic)
        g.source = path
        return g
    if not os.path.exists(path):
        raise QCError(f"{path}: no such model file")
    if os.path.isdir(path):
        raise QCError(f"{path}: is a directory, not a model file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        from .frontends.onnx import load_onnx
        return load_onnx(path)
    if ext == ".pt2":
        from .frontends.torch import load_pt2
        return load_pt2(path)
    raise QCError(f"{path}: unsupported model file type '{ext}' (expected .onnx, .pt2 or zoo:NAME)")


def _file_sha(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def op_counts(graph: Graph) -> dict[str, int]:
    """How often each op kind occurs: {"conv2d": 4, "relu": 5, ...} (ATen names without namespace)."""
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_function":
            k = op_name(n).split(".")[-1]
            counts[k] = counts.get(k, 0) + 1
    return counts


def recipe_summary(recipe: dict, record: list[dict]) -> dict:
    """The recipe record plus what its passes did: which changed the graph ("ran") and, for
    each that declined a match or found none, the reason strings from the pass record."""
    from .config import BASE_PRE_PASSES
    st = recipe.get("settings", {})
    mine = {p for p in st.get("pre_passes", []) if p not in BASE_PRE_PASSES}
    mine |= {p for p in ("gptq", "bias_correction", "log_act") if st.get(p)} | \
        ({"reparam_prepare", "reparam"} if st.get("reparam") else set())
    ran = [r["pass"] for r in record if r["pass"] in mine and r["changed"]]
    declined = {r["pass"]: r["declined"] or ["no candidates in this graph"]
                for r in record if r["pass"] in mine and (r["declined"] or not r["changed"])}
    return {**recipe, "ran": ran, "declined": declined}


def quantize(graph: Graph, calib: CalibData, config: Config,
             progress: Callable[[str], None] | None = None) -> tuple[Graph, Graph, list[dict]]:
    """Run the pre-quantization passes, then annotate / calibrate / fake-quant, with `config` as
    given (compile() applies the recipe first: Config.with_recipe).
    Returns (float graph after the equivalence passes, fake-quant graph, pass record)."""
    calib.validate(graph.inputs)
    ctx = PassContext(config=config, calib=calib)
    pm = PassManager([*config.pre_passes, *config.passes], verify_each=config.verify_each, progress=progress)
    graph = pm.run(graph, ctx)
    float_graph = graph.copy()
    if config.reparam:
        config.extra.setdefault("reparam_parts", list(config.reparam))
    qm = PassManager(config.quantize_passes(), verify_each=config.verify_each, progress=progress)
    qgraph = qm.run(graph, ctx)
    return float_graph, qgraph, pm.record + qm.record


def compile(model: Any, calib: CalibData | Mapping[str, np.ndarray] | str | Iterable[Mapping[str, Any]], *, config: Config | None = None,
            target: str | None = None, example_inputs=None,
            progress: Callable[[str], None] | None = None) -> Artifact:
    """Compile a model into an artifact for `target` ("onnx", "reference", "tvm-llvm[:MCPU]", "tvm-cuda[:ARCH]")."""
    from . import backends
    from .passes.calibrate import quality_report

    config = config or Config()
    if target:
        config.target = target
    backend = backends.get(config.target)
    if getattr(backend, "INTEGER_ONLY", False):
        config.integer = True  # the TVM targets compile integer-only graphs, nothing else
    if isinstance(calib, str):
        calib = CalibData.from_npz(calib, batch_size=config.calib_batch_size)
    elif isinstance(calib, Mapping):
        calib = CalibData(calib, batch_size=config.calib_batch_size)
    elif not isinstance(calib, CalibData):
        calib = CalibData.from_batches(calib, batch_size=config.calib_batch_size)
    graph = load_model(model, example_inputs)
    config, recipe = config.with_recipe(op_counts(graph))
    float_graph, qgraph, record = quantize(graph, calib, config, progress)
    if progress:
        progress("quality report")
    quality = quality_report(float_graph, qgraph, calib)
    out_graph, integer = qgraph, None
    if config.integer:
        if not getattr(backend, "INTEGER", False):
            raise QCError(f"target '{config.target}' does not take integer-only graphs (use --target reference, tvm-llvm or tvm-cuda)")
        from .passes.lower_integer import agreement
        pm = PassManager(["lower_integer"], progress=progress)
        out_graph = pm.run(qgraph.copy(), PassContext(config=config, calib=calib))
        record = record + pm.record
        integer = {**out_graph.meta["integer"],
                   "agreement_with_fake_quant": agreement(qgraph, out_graph, calib.batches(qgraph.inputs, 4))}
    if progress:
        progress(f"emit {config.target}")
    files = backend.emit(out_graph)
    src = os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": config.target,
        "runtime": backend.RUNTIME,
        "source": {"model": os.path.basename(src) if not src.startswith("zoo:") else src,
                   "sha256": _file_sha(src) if isinstance(model, (str, os.PathLike)) else None},
        "inputs": [s.to_json() for s in qgraph.inputs],
        "outputs": [s.to_json() for s in qgraph.outputs],
        "config": config.to_json(),
        "recipe": recipe_summary(recipe, record),
        "passes": record,
        "layers": layer_table(qgraph),
        "mixed_precision": _mixed_precision_summary(qgraph),
        "integer": integer,
        "quality": {"calibration_samples": calib.num_samples, "layers": quality,
                    "summary": _quality_summary(quality)},
        "versions": {"qcompiler": __version__, "torch": torch.__version__.split("+")[0],
                     "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"),
                     "python": platform.python_version(),
                     **({"tvm": _version("tvm")} if config.target.startswith("tvm") else {})},
    }
    return Artifact(manifest, files).finalize()


def layer_table(graph: Graph) -> list[dict]:
    """Per quantized layer: bits, granularity, scales and zero points of each quantized input."""
    rows = []
    for n in graph.nodes:
        info = n.meta.get(QMETA)
        if not info:
            continue
        row = {"name": n.name, "op": info["op"], "w_bits": None, "a_bits": None, "inputs": []}
        if "sensitivity" in info:
            row["hessian_trace"] = info["sensitivity"]["trace"]
            if "quad" in info["sensitivity"]:  # dW^T H dW per weight width, the default Omega_w
                row["hessian_quadratic_by_bits"] = {str(b): v for b, v in info["sensitivity"]["quad"].items()}
        if "mixed_precision" in info:
            row["omega"] = info["mixed_precision"]["omega"]
            row["omega_by_config"] = info["mixed_precision"]["options"]
        for i, q in sorted(info["inputs"].items()):
            spec, qp = q["spec"], q["qparams"]
            row["w_bits" if q["role"] == "weight" else "a_bits"] = spec.bits
            row["inputs"].append({"index": i, "role": q["role"], "tensor": n.args[i].args[0].name,
                                  "spec": spec.to_json(), "granularity": spec.granularity, **qp.to_json()})
        if info.get("output") is not None:  # integer mode: the op's output is a quantization point
            spec, qp = info["output"]["spec"], info["output"]["qparams"]
            row["a_bits"] = row["a_bits"] or spec.bits
            row["output"] = {"spec": spec.to_json(), **qp.to_json()}
        rows.append(row)
    return rows


def _mixed_precision_summary(graph: Graph) -> dict | None:
    """The ILP's outcome (objective, totals, slack of each budget); solve time is left out so
    the manifest stays a function of the inputs."""
    mp = graph.meta.get("mixed_precision")
    return None if mp is None else {k: v for k, v in mp.items() if k != "solve_seconds"}


def _quality_summary(rows: list[dict]) -> dict:
    outs = [r["output_sqnr_db"] for r in rows if r.get("output_sqnr_db") is not None
            and abs(r["output_sqnr_db"]) != float("inf")]  # an exactly reproduced value (a graph input) says nothing
    worst = min(rows, key=lambda r: r["output_sqnr_db"]) if rows else None
    return {"layers": len(rows), "min_output_sqnr_db": min(outs) if outs else None,
            "worst_layer": worst["layer"] if worst else None,
            "mean_output_sqnr_db": round(sum(outs) / len(outs), 2) if outs else None}


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


class CompiledModel:
    """A loaded artifact: call it with {input name: array} (or positional arrays in input
    order); it returns {output name: array}."""

    def __init__(self, path: str, manifest: dict, runner):
        self.path, self.manifest, self.runner = path, manifest, runner
        self.inputs = [TensorSpec.from_json(d) for d in manifest["inputs"]]
        self.outputs = [TensorSpec.from_json(d) for d in manifest["outputs"]]

    def __call__(self, *args, **kw) -> dict[str, np.ndarray]:
        feeds = dict(args[0]) if len(args) == 1 and isinstance(args[0], Mapping) else \
            {s.name: a for s, a in zip(self.inputs, args)}
        feeds.update(kw)
        for s in self.inputs:
            if s.name not in feeds:
                raise QCError(f"missing input '{s.name}' (inputs: {[x.name for x in self.inputs]})")
            s.check(np.asarray(feeds[s.name]))
        unknown = [k for k in feeds if k not in {s.name for s in self.inputs}]
        if unknown:
            raise QCError(f"unknown inputs {unknown} (inputs: {[x.name for x in self.inputs]})")
        feeds = {s.name: np.ascontiguousarray(np.asarray(feeds[s.name]).astype(s.dtype, copy=False))
                 for s in self.inputs}
        return self.runner.run(feeds)


def load(path: str | os.PathLike) -> CompiledModel:
    from . import backends
    path = os.fspath(path)
    manifest, _ = read_artifact(path)
    runner = backends.get(manifest["backend"]).load(path, manifest)
    return CompiledModel(path, manifest, runner)
