"""The `qcompiler` command: compile, run, inspect, profile.

Bad input prints one line `qcompiler: error: ...` on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from .errors import QCError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcompiler", description="A compiler for quantized neural networks.")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="quantize a model and write an artifact directory")
    c.add_argument("model", help="model file (.onnx, .pt2) or zoo:NAME (bundled: minilm, fashion_cnn, fashion_vit, digits_cnn)")
    c.add_argument("-o", "--output", required=True, help="artifact directory to create")
    c.add_argument("--calib", help="calibration .npz: one array per model input, keyed by input name, samples on axis 0")
    c.add_argument("--target", default="onnx", help="onnx (default), reference, tvm-llvm[:MCPU] or tvm-cuda[:ARCH] "
                   "(the tvm targets compile integer-only graphs: they imply --integer)")
    c.add_argument("--w-bits", type=int, default=8)
    c.add_argument("--a-bits", type=int, default=8)
    c.add_argument("--w-granularity", default="channel", choices=["channel", "tensor", "group"])
    c.add_argument("--w-group-size", type=int, default=0)
    c.add_argument("--a-asym", action="store_true", help="asymmetric activations (default: symmetric int8, TensorRT-compatible)")
    c.add_argument("--observer", default="minmax", choices=["minmax", "percentile", "mse", "kl"])
    c.add_argument("--percentile", type=float, default=99.99)
    c.add_argument("--pass", dest="passes", action="append", default=[], metavar="NAME|module:Class",
                   help="extra pass to run before quantization (repeatable)")
    c.add_argument("--keep-float", action="append", default=[], metavar="GLOB",
                   help="leave layers whose node name matches GLOB in float (repeatable)")
    c.add_argument("--bits", metavar="B1,B2", help="mixed precision: candidate weight widths (e.g. 4,8); each layer's "
                   "width is chosen by an ILP over Hessian-trace sensitivity under the budgets below")
    c.add_argument("--size-mb", type=float, help="mixed precision: weight size budget in MB (10^6 bytes)")
    c.add_argument("--bops", type=float, help="mixed precision: budget of bit operations (MACs x w_bits x a_bits)")
    c.add_argument("--latency-ms", type=float, help="mixed precision: latency budget (needs --latency-table)")
    c.add_argument("--latency-ratio", type=float, metavar="R",
                   help="mixed precision: latency budget of R x the all-w8a8 latency in --latency-table")
    c.add_argument("--latency-table", help="JSON {\"<op>:<weight shape>:<config>\": ms} measured on the target")
    c.add_argument("--omega", choices=["quadratic", "trace"], help="mixed precision: a layer's sensitivity at a width, "
                   "dW^T H dW along the rounding error dW (quadratic, default) or HAWQ-V3's Tr(H)/n ||dW||^2 (trace)")
    c.add_argument("--pin", action="append", default=[], metavar="NAME=BITS",
                   help="mixed precision: fix a layer's weight width (repeatable)")
    c.add_argument("--gptq", action="store_true", help="round weights with GPTQ on the calibration data")
    c.add_argument("--bias-correction", action="store_true",
                   help="correct each layer's bias for the mean output shift of weight quantization")
    c.add_argument("--reparam", metavar="PARTS", help="RepQ-ViT reparameterization: layernorm, softmax or both "
                   "(comma-separated); not with --integer")
    c.add_argument("--log-act", metavar="KINDS", help="log quantizers for power-law activations: softmax, gelu or "
                   "both (comma-separated; post-GELU inputs are shifted non-negative, the shift folded into the "
                   "next linear's bias); not with --integer")
    c.add_argument("--log-base", default="sqrt2", choices=["2", "sqrt2"], help="base of the --log-act quantizers")
    c.add_argument("--integer", action="store_true",
                   help="lower to an integer-only graph (dyadic requantization, integer Softmax/GELU/LayerNorm); "
                   "needs --target reference or a tvm target (those imply it)")
    c.add_argument("--allow-float", action="append", default=[], metavar="NAME",
                   help="with --integer: let this node (glob) run in float between a dequantize and a quantize; "
                   "the manifest lists it (repeatable)")
    c.add_argument("--recipe", default="auto", choices=["auto", "none", "transformer", "vit", "cnn", "generic"],
                   help="pass combination per architecture; auto (default) detects it from the graph's ops unless "
                   "--pass, --gptq, --bias-correction or --reparam name passes; none: only the default passes")
    c.add_argument("--calib-batch-size", type=int, default=8)
    c.add_argument("--force", action="store_true", help="replace an existing non-empty output directory")

    r = sub.add_parser("run", help="run an artifact on inputs from an .npz file")
    r.add_argument("artifact")
    r.add_argument("--input", required=True, help=".npz with one array per model input, keyed by name")
    r.add_argument("--output", required=True, help=".npz to write, one array per model output")

    i = sub.add_parser("inspect", help="print an artifact's layers, bits, scales and SQNR")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print the manifest's layer table as JSON")

    sub.add_parser("passes", help="list registered passes")

    f = sub.add_parser("profile", help="time each layer at each configuration on a target; write a latency table")
    f.add_argument("model", help="model file (.onnx, .pt2) or zoo:NAME")
    f.add_argument("--calib", required=True, help="calibration .npz: its first --batch samples give the layer shapes")
    f.add_argument("-o", "--output", required=True, help="latency table JSON to write")
    f.add_argument("--target", default="onnx-cpu",
                   help="timer: onnx-cpu (default), tvm-llvm (qcompiler's integer artifacts; no float) or torch-cuda")
    f.add_argument("--bits", default="4,8", metavar="B1,B2", help="weight widths (default 4,8)")
    f.add_argument("--a-bits", default="8", metavar="A1,A2", help="activation widths (default 8)")
    f.add_argument("--no-float", action="store_true", help="do not time the float configuration")
    f.add_argument("--batch", type=int, default=8, help="samples per run: the batch dims of the timed shapes")
    f.add_argument("--repeats", type=int, default=20, help="interleaved timing rounds (medians are kept)")
    f.add_argument("--warmup", type=int, default=2)
    f.add_argument("--threads", type=int, help="onnx-cpu: intra-op threads (default: ONNX Runtime's, as artifacts run)")
    return p


def _progress(name: str) -> None:
    if sys.stderr.isatty():
        print(f"  - {name}", file=sys.stderr)


def cmd_compile(a) -> int:
    from .artifact import check_output_dir
    from .calib import CalibData
    from .compiler import compile as qc_compile
    from .config import Config

    out = os.path.abspath(a.output)
    check_output_dir(out, force=a.force)  # fail before any expensive work
    if not a.calib:
        raise QCError("--calib CALIB.npz is required: qcompiler never calibrates on random data "
                      "(save one array per model input, keyed by input name, samples along axis 0)")
    if not a.model.startswith("zoo:") and not os.path.exists(a.model):
        raise QCError(f"{a.model}: no such model file")
    cfg = Config(target=a.target, w_bits=a.w_bits, a_bits=a.a_bits, w_granularity=a.w_granularity,
                 w_group_size=a.w_group_size, a_symmetric=not a.a_asym, observer=a.observer,
                 percentile=a.percentile, passes=tuple(a.passes), exclude=tuple(a.keep_float),
                 calib_batch_size=a.calib_batch_size, integer=a.integer, allow_float=tuple(a.allow_float),
                 gptq=a.gptq, bias_correction=a.bias_correction,
                 reparam=tuple(p for p in (a.reparam or "").split(",") if p), recipe=a.recipe,
                 log_act=tuple(p for p in (a.log_act or "").split(",") if p), log_act_base=a.log_base)
    if a.allow_float and not a.integer:
        raise QCError("--allow-float only applies with --integer")
    cfg.extra.update(_mixed_precision_options(a))
    calib = CalibData.from_npz(a.calib, batch_size=a.calib_batch_size)
    t0 = time.perf_counter()
    art = qc_compile(a.model, calib, config=cfg, progress=_progress)
    path = art.save(out, force=a.force)
    q = art.manifest["quality"]["summary"]
    size = sum(len(v) for v in art.files.values())
    r = art.manifest["recipe"]
    print(f"recipe {r['name']} ({r['reason']}; pattern {r['pattern']}): ran {', '.join(r['ran']) or 'nothing'}"
          + "".join(f"; {p} declined: {why[0]}" + (f" (+{len(why) - 1} more)" if len(why) > 1 else "")
                    for p, why in r["declined"].items()))
    print(f"wrote {path}: {q['layers']} quantized layers, {size / 1e6:.2f} MB, "
          f"min layer-output SQNR {q['min_output_sqnr_db']} dB ({q['worst_layer']}), "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def _mixed_precision_options(a) -> dict:
    budgets = {"size_mb": a.size_mb, "bops": a.bops, "latency_ms": a.latency_ms, "latency_ratio": a.latency_ratio}
    if not a.bits:
        if any(v is not None for v in budgets.values()) or a.pin or a.latency_table or a.omega:
            raise QCError("budgets, --pin and --omega need --bits (the candidate weight widths, e.g. --bits 4,8)")
        return {}
    try:
        bits = sorted({int(b) for b in a.bits.split(",")})
        pins = {k: int(v) for k, v in (p.split("=", 1) for p in a.pin)}
    except ValueError:
        raise QCError(f"--bits takes widths like 4,8 and --pin NAME=BITS (got --bits {a.bits}, --pin {a.pin})") from None
    if any(not 2 <= b <= 16 for b in bits):
        raise QCError(f"--bits widths must be between 2 and 16, got {bits}")
    mp = {"bits": bits, "pins": pins, **{k: v for k, v in budgets.items() if v is not None},
          **({"omega": a.omega} if a.omega else {})}
    out = {"mixed_precision": mp}
    if a.latency_ms is not None and a.latency_ratio is not None:
        raise QCError("give either --latency-ms or --latency-ratio, not both")
    if a.latency_ratio is not None and not a.latency_ratio > 0:
        raise QCError(f"--latency-ratio must be positive, got {a.latency_ratio}")
    if (a.latency_ms is not None or a.latency_ratio is not None) and not a.latency_table:
        raise QCError("--latency-ms and --latency-ratio need --latency-table (latency is measured, never assumed; "
                      "write one with `qcompiler profile`)")
    if a.latency_table:
        from .latency import load_table
        out["latency_table"] = dict(load_table(a.latency_table))
    return out


def _widths(text: str, flag: str) -> list[int]:
    try:
        bits = sorted({int(b) for b in text.split(",")})
    except ValueError:
        raise QCError(f"{flag} takes widths like 4,8 (got {text})") from None
    if any(not 2 <= b <= 16 for b in bits):
        raise QCError(f"{flag} widths must be between 2 and 16, got {bits}")
    return bits


def cmd_profile(a) -> int:
    import shlex

    from .calib import CalibData
    from .compiler import load_model
    from .latency import TIMERS, profile_layers, save_table

    if not a.model.startswith("zoo:") and not os.path.exists(a.model):
        raise QCError(f"{a.model}: no such model file")
    if a.batch < 1 or a.repeats < 1:
        raise QCError("--batch and --repeats must be at least 1")
    out = os.path.abspath(a.output)
    if not os.path.isdir(os.path.dirname(out)):
        raise QCError(f"{out}: its folder does not exist")
    configs = [f"w{w}a{x}" for w in _widths(a.bits, "--bits") for x in _widths(a.a_bits, "--a-bits")]
    integer_only = getattr(TIMERS.get(a.target), "integer_only", False)  # tvm-llvm: no float configuration
    configs += [] if a.no_float or integer_only else ["float"]
    calib = CalibData.from_npz(a.calib, batch_size=a.batch)
    graph = load_model(a.model)
    calib.validate(graph.inputs)
    t0 = time.perf_counter()
    table = profile_layers(graph, a.target, configs, calib=calib, batch=a.batch, repeats=a.repeats, warmup=a.warmup,
                           timer_options={"threads": a.threads} if a.threads else None)
    cmd = ["qcompiler", "profile", a.model, "--calib", a.calib, "-o", a.output, "--target", a.target, "--bits", a.bits,
           "--a-bits", a.a_bits, "--batch", str(a.batch), "--repeats", str(a.repeats), "--warmup", str(a.warmup),
           *(["--threads", str(a.threads)] if a.threads else [])]
    save_table(out, table, command=shlex.join(cmd + (["--no-float"] if a.no_float else [])), model=a.model)
    print(f"wrote {out}: {len(table)} entries ({', '.join(configs)}) on {a.target}, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def cmd_run(a) -> int:
    from .calib import read_npz
    from .compiler import load

    model = load(a.artifact)
    feeds = read_npz(a.input, "input")
    outs = model(feeds)
    out = os.path.abspath(a.output)
    d = os.path.dirname(out)
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise QCError(f"{out}: cannot write here")
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=d)
    os.close(fd)
    try:
        np.savez(tmp, **outs)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {out}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in outs.items()))
    return 0


def cmd_inspect(a) -> int:
    import json

    from .artifact import read_artifact

    m, files = read_artifact(a.artifact)
    if a.json:
        print(json.dumps(m["layers"], indent=1))
        return 0
    quality = {r["layer"]: r for r in m["quality"]["layers"]}
    print(f"{a.artifact}: backend {m['backend']} (runtime {m['runtime']}), source {m['source']['model']}")
    print("inputs:  " + ", ".join(f"{s['name']} {s['shape']} {s['dtype']}" for s in m["inputs"]))
    print("outputs: " + ", ".join(f"{s['name']} {s['shape']} {s['dtype']}" for s in m["outputs"]))
    print("files:   " + ", ".join(f"{k} ({v['bytes'] / 1e6:.2f} MB)" for k, v in m["files"].items()))
    hdr = f"{'layer':<28} {'op':<12} {'W':>3} {'A':>3} {'w gran':<8} {'w scale (min..max)':<22} {'a scale':>10} {'a zp':>5} {'W dB':>7} {'in dB':>7} {'out dB':>7}"
    print(hdr)
    print("-" * len(hdr))
    for row in m["layers"]:
        w = next((x for x in row["inputs"] if x["role"] == "weight"), None)
        act = next((x for x in row["inputs"] if x["role"] == "act"), None) or row.get("output")
        q = quality.get(row["name"], {})
        in_db = next((v for k, v in q.items() if k.startswith("input") and k.endswith("_sqnr_db")), None)
        ws = f"{min(w['scale']):.2e}..{max(w['scale']):.2e}" if w else "-"
        a_scale = f"{act['scale'][0]:.3e}" if act else "-"
        a_zp = act["zero_point"][0] if act else "-"
        print(f"{row['name'][:28]:<28} {row['op'].split('.')[-1]:<12} {row['w_bits'] or '-':>3} {row['a_bits'] or '-':>3} "
              f"{(w['granularity'] if w else '-'):<8} {ws:<22} {a_scale:>10} {a_zp:>5} {_db(q.get('weight_sqnr_db')):>7} {_db(in_db):>7} "
              f"{_db(q.get('output_sqnr_db')):>7}")
    s = m["quality"]["summary"]
    print(f"{s['layers']} layers; layer-output SQNR mean {s['mean_output_sqnr_db']} dB, "
          f"min {s['min_output_sqnr_db']} dB at {s['worst_layer']}")
    integer = m.get("integer")
    if integer:
        ops = ", ".join(f"{k} x{v}" for k, v in integer["ops"].items() if k.startswith("qc."))
        print(f"integer-only graph: {ops}")
        print(f"float islands: {', '.join(integer['float_islands']) or 'none'}")
        for name, a in integer["agreement_with_fake_quant"].items():
            print(f"output {name}: {a['within_1_lsb']:.2%} of elements within 1 LSB of the fake-quant graph "
                  f"({a['equal']:.2%} equal, max {a['max_lsb']} LSB) on calibration batches")
    return 0


def _db(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def cmd_passes(a) -> int:
    from .pipeline import registered
    for name, cls in sorted(registered().items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:<20} {cls.numerics:<9} {doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        return {"compile": cmd_compile, "run": cmd_run, "inspect": cmd_inspect, "passes": cmd_passes,
                "profile": cmd_profile}[a.cmd](a)
    except QCError as e:
        print(f"qcompiler: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompiler: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
