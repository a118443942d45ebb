import json

import pytest
import torch

import qcompiler
from qcompiler.calib import CalibData
from qcompiler.cli import main
from qcompiler.config import Config
from qcompiler.errors import QCError
from qcompiler.ir import QMETA
from qcompiler.latency import (LatencyTable, load_table, parse_config, profile_layers, save_table, timer,
                               _pack_int4, _unpack_int4)
from qcompiler.passes.mixed_precision import latency_key, lookup_latency
from qcompiler.passes.quantize import layers
from qcompiler.pipeline import PassContext, PassManager

CONFIGS = ("w4a8", "w8a8")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()


@pytest.fixture(scope="module")
def profiled():
    """The tiny MLP, its calibration data and its latency table (2 timing rounds)."""
    m, x = _mlp(), torch.randn(32, 16)
    g = qcompiler.trace(m, (x[:2],))
    calib = CalibData({"input": x.numpy()}, batch_size=16)
    return g, calib, profile_layers(g, "onnx-cpu", CONFIGS, calib=calib, repeats=2, warmup=1, progress=False)


def test_table_keys_are_what_assign_bit_widths_looks_up(profiled):
    """One entry per distinct (op, weight shape, config); every layer finds each of its options' entries."""
    g, _, table = profiled
    assert sorted(table) == sorted(f"aten.linear:{w}:{c}" for w in ("32x16", "32x32", "8x32") for c in CONFIGS)
    assert all(v > 0 for v in table.values())
    ag = PassManager(["annotate"]).run(g.copy())
    for n in layers(ag):
        w = ag.attr(n.args[1])
        for c in CONFIGS:
            assert lookup_latency(table, n, w.shape, c) == table[latency_key(n.meta[QMETA]["op"], w.shape, c)]
    e = table.meta["entries"]["aten.linear:32x32:w8a8"]
    assert e["input_shape"] == [16, 32] and e["weight_shape"] == [32, 32]  # batch dims from the calibration batch
    assert table.meta["target"] == "onnx-cpu" and "int8" in table.meta["notes"] and table.meta["onnxruntime"]


def test_json_round_trip_with_metadata(profiled, tmp_path):
    """save_table / load_table keep every entry and the metadata; a plain {key: ms} file loads too."""
    _, _, table = profiled
    path = tmp_path / "t.json"
    save_table(path, table, command="qcompiler profile m.onnx ...")
    back = load_table(path)
    assert back == table and back.meta["command"] == "qcompiler profile m.onnx ..."
    doc = json.loads(path.read_text())
    assert doc["format"] == "qcompiler-latency-table" and {"device", "date", "torch", "onnxruntime"} <= set(doc["meta"])
    (tmp_path / "plain.json").write_text(json.dumps({"aten.linear:8x32:w8a8": 0.5}))
    assert load_table(tmp_path / "plain.json") == {"aten.linear:8x32:w8a8": 0.5}
    (tmp_path / "bad.json").write_text(json.dumps({"aten.linear:8x32:w8a8": "fast"}))
    with pytest.raises(QCError, match="must be numbers"):
        load_table(tmp_path / "bad.json")


def test_ilp_honours_a_latency_budget_from_the_measured_table(profiled):
    """With the measured table and a budget halfway between the fastest and slowest assignment, the
    ILP's total latency (summed from the table entries of the chosen configs) stays within it."""
    g, calib, table = profiled
    ag = PassManager(["annotate"]).run(g.copy())
    keys = [[latency_key("aten.linear", ag.attr(n.args[1]).shape, c) for c in CONFIGS] for n in layers(ag)]
    lo, hi = sum(min(table[k] for k in ks) for ks in keys), sum(max(table[k] for k in ks) for ks in keys)
    budget = 0.5 * (lo + hi)
    cfg = Config(extra={"mixed_precision": {"bits": [4, 8], "latency_ms": budget}, "latency_table": dict(table),
                        "sensitivity": {"max_iters": 10, "progress": False}})
    out = PassManager(["annotate", "sensitivity", "mixed_precision"]).run(g.copy(), PassContext(cfg, calib))
    res = out.meta["mixed_precision"]
    chosen = sum(table[latency_key("aten.linear", out.attr(n.args[1]).shape, n.meta[QMETA]["mixed_precision"]["config"])]
                 for n in layers(out))
    assert chosen == pytest.approx(res["totals"]["latency_ms"]) and chosen <= budget * (1 + 1e-9)
    assert res["slack"]["latency"] >= -1e-12


def test_configs_timers_and_int4_packing():
    """Config names parse; unknown targets and configs are errors; int4 packing round-trips [-8, 7]."""
    assert parse_config("w4a8") == (4, 8) and parse_config("w8") == (8, None) and parse_config("float") == (None, None)
    with pytest.raises(QCError, match="bad configuration"):
        parse_config("int8")
    with pytest.raises(QCError, match="no latency timer for target 'tvm-cuda'"):
        timer("tvm-cuda")
    q = torch.randint(-8, 8, (5, 12), dtype=torch.int8)
    assert torch.equal(_unpack_int4(_pack_int4(q)), q) and _pack_int4(q).shape == (5, 6)
    assert isinstance(LatencyTable({"a": 1.0}), dict)


def test_tvm_llvm_timer_times_qcompilers_own_integer_artifacts():
    """The tvm-llvm timer compiles each case to qcompiler's integer artifact and times it; a 'float'
    configuration is refused with the layer named (the TVM backend is integer-only)."""
    pytest.importorskip("tvm")
    m, x = _mlp(), torch.randn(32, 16)
    g = qcompiler.trace(m, (x[:2],))
    calib = CalibData({"input": x.numpy()}, batch_size=16)
    table = profile_layers(g, "tvm-llvm", ("w8a8", "w4a8"), calib=calib, repeats=2, warmup=1, progress=False)
    assert sorted(table) == sorted(f"aten.linear:{w}:{c}" for w in ("32x16", "32x32", "8x32") for c in ("w8a8", "w4a8"))
    assert all(v > 0 for v in table.values())
    assert table.meta["target"] == "tvm-llvm" and "tvm" in table.meta
    with pytest.raises(QCError, match=r"linear.*no 'float' configuration"):
        profile_layers(g, "tvm-llvm", ("float",), calib=calib, repeats=1, progress=False)


def test_cli_profile_then_compile_with_latency_ratio(cnn_files, tmp_path, capsys):
    """`qcompiler profile` writes a table with its command; `compile --bits 4,8 --latency-ratio R` keeps the
    latency within R x the all-w8a8 latency of that table and records the budget in the manifest."""
    table_path = tmp_path / "table.json"
    code = main(["profile", str(cnn_files["onnx"]), "--calib", str(cnn_files["calib"]), "-o", str(table_path),
                 "--bits", "4,8", "--no-float", "--batch", "4", "--repeats", "2", "--warmup", "1"])
    assert code == 0, capsys.readouterr().err
    table = load_table(table_path)
    assert len(table) == 6 and table.meta["command"].startswith("qcompiler profile ")
    w8 = [v for k, v in table.items() if k.endswith(":w8a8")]
    lo = sum(min(table[k.replace(":w8a8", ":w4a8")], table[k]) for k in table if k.endswith(":w8a8"))
    ratio = 0.5 * (1 + lo / sum(w8))
    out = tmp_path / "art"
    code = main(["compile", str(cnn_files["onnx"]), "--calib", str(cnn_files["calib"]), "-o", str(out),
                 "--bits", "4,8", "--latency-table", str(table_path), "--latency-ratio", str(ratio)])
    assert code == 0, capsys.readouterr().err
    mp = json.loads((out / "manifest.json").read_text())["mixed_precision"]
    assert mp["all_w8a8_latency_ms"] == pytest.approx(sum(w8))
    assert mp["totals"]["latency_ms"] <= ratio * sum(w8) * (1 + 1e-9) and mp["slack"]["latency"] >= -1e-12
    code = main(["compile", str(cnn_files["onnx"]), "--calib", str(cnn_files["calib"]), "-o", str(tmp_path / "x"),
                 "--bits", "4,8", "--latency-ratio", "0.9"])
    assert code == 2 and "need --latency-table" in capsys.readouterr().err
