import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler.cli import main

QC = [sys.executable, "-m", "qcompiler.cli"]


def _cli(*args, cwd=None):
    return subprocess.run([*QC, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def _tree_digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _no_leftovers(parent: Path, name: str):
    return not any(p.name.startswith(f".{name}.") for p in parent.iterdir())


def test_compile_run_inspect_end_to_end(cnn_files, tmp_path):
    """compile -> run -> inspect through the real command; outputs match the fake-quant graph; reruns are byte-identical."""
    out1, out2 = tmp_path / "a", tmp_path / "b"
    r = _cli("compile", cnn_files["onnx"], "--calib", cnn_files["calib"], "-o", out1)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (out1 / "model.onnx").is_file() and (out1 / "manifest.json").is_file()
    r2 = _cli("compile", cnn_files["onnx"], "--calib", cnn_files["calib"], "-o", out2)
    assert r2.returncode == 0, r2.stderr
    assert _tree_digest(out1) == _tree_digest(out2)  # same inputs and options -> byte-identical artifact

    res = tmp_path / "res.npz"
    r = _cli("run", out1, "--input", cnn_files["inputs"], "--output", res)
    assert r.returncode == 0, r.stderr
    with np.load(res) as z:
        logits = z["logits"]
    assert logits.shape == (5, 10)
    # the float model and the W8A8 artifact agree on the argmax of most samples and closely in value
    import torch
    with np.load(cnn_files["inputs"]) as z:
        x = z["image"]
    ref = cnn_files["module"](torch.from_numpy(x)).detach().numpy()
    assert np.abs(logits - ref).max() < 0.1 * np.abs(ref).max()

    r = _cli("inspect", out1)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any("conv" in l.lower() for l in lines) and "SQNR" in r.stdout
    m = json.loads((out1 / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["inputs"][0]["name"] == "image" and m["inputs"][0]["shape"][0] == "batch"
    assert {l["w_bits"] for l in m["layers"]} == {8} and all(l["inputs"] for l in m["layers"])
    assert [p["pass"] for p in m["passes"]][:2] == ["remove_identities", "fold_bn"]
    assert next(p for p in m["passes"] if p["pass"] == "fold_bn")["stats"] == {"BatchNormIntoConv": 2}
    for name, info in m["files"].items():
        assert hashlib.sha256((out1 / name).read_bytes()).hexdigest() == info["sha256"]


def test_bad_input_subprocess_exit_code(tmp_path):
    """A bad model file exits with status 2 and one line on stderr, no traceback."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 3), np.float32))
    r = _cli("compile", bad, "--calib", tmp_path / "c.npz", "-o", tmp_path / "out")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("qcompiler: error:") and "bad.onnx" in r.stderr
    assert not (tmp_path / "out").exists()


def _run_main(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def unsupported_onnx(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"),
             helper.make_node("Hardmax", ["r"], ["y"], name="weird_hardmax")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    p = tmp_path / "unsupported.onnx"
    onnx.save(model, p)
    return p


def _calib(tmp_path, name="c.npz", **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


BAD_CASES = {
    "missing model": (lambda d, f: [d / "nope.onnx", "--calib", f["calib"]], "no such model file"),
    "truncated model": (lambda d, f: [_truncate(d, f["onnx"]), "--calib", f["calib"]], "not a valid ONNX"),
    "no calibration": (lambda d, f: [f["onnx"]], "--calib"),
    "NaN calibration": (lambda d, f: [f["onnx"], "--calib", _calib(d, image=_nan_images())], "NaN"),
    "empty calibration": (lambda d, f: [f["onnx"], "--calib", _calib(d, image=np.zeros((0, 3, 16, 16), np.float32))],
                          "empty calibration"),
    "wrong names": (lambda d, f: [f["onnx"], "--calib", _calib(d, pixels=np.zeros((4, 3, 16, 16), np.float32))],
                    "do not match the model inputs"),
    "wrong shapes": (lambda d, f: [f["onnx"], "--calib", _calib(d, image=np.zeros((4, 3, 16), np.float32))],
                     "'image' has shape"),
    "unreadable calibration": (lambda d, f: [f["onnx"], "--calib", _garbage(d / "c.npz")], "not a readable .npz"),
}


def _truncate(d: Path, src: Path) -> Path:
    p = d / "truncated.onnx"
    data = src.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _garbage(p: Path) -> Path:
    p.write_bytes(b"PK\x03\x04 not really a zip")
    return p


def _nan_images():
    a = np.zeros((4, 3, 16, 16), np.float32)
    a[1, 2, 3, 4] = np.nan
    return a


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_inputs_give_one_clear_line(case, cnn_files, tmp_path, capsys):
    """Each bad input: exit 2, one line naming the problem, no output directory, no temp leftovers."""
    make_args, expect = BAD_CASES[case]
    out = tmp_path / "out"
    code, err = _run_main(capsys, "compile", *make_args(tmp_path, cnn_files), "-o", out)
    assert code == 2, err
    assert err.startswith("qcompiler: error:") and expect in err and err.strip().count("\n") == 0, err
    assert not out.exists() and _no_leftovers(tmp_path, "out")


def test_unsupported_op_names_node_op_and_opset(unsupported_onnx, tmp_path, capsys):
    """An unsupported ONNX op is reported with its node name, op type and opset."""
    calib = _calib(tmp_path, x=np.ones((4, 4), np.float32))
    code, err = _run_main(capsys, "compile", unsupported_onnx, "--calib", calib, "-o", tmp_path / "out")
    assert code == 2 and "weird_hardmax" in err and "Hardmax" in err and "17" in err, err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(cnn_files, tmp_path, capsys):
    """A non-empty output directory is refused unless --force, which replaces it atomically."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = _run_main(capsys, "compile", cnn_files["onnx"], "--calib", cnn_files["calib"], "-o", out)
    assert code == 2 and "not empty" in err and (out / "keep.txt").exists()
    code, err = _run_main(capsys, "compile", cnn_files["onnx"], "--calib", cnn_files["calib"], "-o", out, "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists() and _no_leftovers(tmp_path, "out")


def test_unwritable_output_path(cnn_files, tmp_path, capsys):
    """An output path under a file, or in a read-only directory, is refused before any work."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run_main(capsys, "compile", cnn_files["onnx"], "--calib", cnn_files["calib"], "-o", blocker / "out")
    assert code == 2 and "does not exist" in err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits
            pytest.skip("running as root: permission bits do not stop writes")
        code, err = _run_main(capsys, "compile", cnn_files["onnx"], "--calib", cnn_files["calib"], "-o", ro / "out")
        assert code == 2 and "permission denied" in err
    finally:
        ro.chmod(0o755)


def test_run_rejects_wrong_input(cnn_files, tmp_path, capsys):
    """run: a tampered artifact and inputs with wrong names/shapes are clear errors."""
    out = tmp_path / "art"
    assert main(["compile", str(cnn_files["onnx"]), "--calib", str(cnn_files["calib"]), "-o", str(out)]) == 0
    capsys.readouterr()
    bad = _calib(tmp_path, "in.npz", image=np.zeros((2, 3, 15, 16), np.float32))
    code, err = _run_main(capsys, "run", out, "--input", bad, "--output", tmp_path / "o.npz")
    assert code == 2 and "shape" in err
    bad = _calib(tmp_path, "in2.npz", img=np.zeros((2, 3, 16, 16), np.float32))
    code, err = _run_main(capsys, "run", out, "--input", bad, "--output", tmp_path / "o.npz")
    assert code == 2 and "missing input 'image'" in err
    with open(out / "model.onnx", "r+b") as f:  # flip one byte
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    code, err = _run_main(capsys, "run", out, "--input", cnn_files["inputs"], "--output", tmp_path / "o.npz")
    assert code == 2 and "sha256" in err


def test_mixed_precision_under_a_size_budget(cnn_files, tmp_path, capsys):
    """--bits 4,8 with a size budget: the ILP picks widths, the budget holds, the manifest records widths, Ω and slack."""
    full = tmp_path / "w8"
    assert main(["compile", str(cnn_files["onnx"]), "--calib", str(cnn_files["calib"]), "-o", str(full)]) == 0
    m8 = json.loads((full / "manifest.json").read_text())
    out = tmp_path / "mixed"
    # weights of the three layers at 8 bits: 8*3*9 + 16*8*9 + 10*16 = 1528 bytes; allow about 75 % of that
    code = main(["compile", str(cnn_files["onnx"]), "--calib", str(cnn_files["calib"]), "-o", str(out),
                 "--bits", "4,8", "--size-mb", "0.00115"])
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    widths = {l["name"]: l["w_bits"] for l in m["layers"]}
    assert set(widths.values()) == {4, 8} and len(widths) == len(m8["layers"])
    assert all("omega" in l and "hessian_trace" in l for l in m["layers"])
    mp = m["mixed_precision"]
    assert mp["totals"]["size_bytes"] <= 1150 and mp["slack"]["size"] >= 0
    assert [p["pass"] for p in m["passes"]][-4:] == ["sensitivity", "mixed_precision", "calibrate", "fake_quant"]
    # the default Omega_w is the quadratic form dW^T H dW at each width, recorded per layer
    assert mp["omega"] == "quadratic"
    for l in m["layers"]:
        quad = l["hessian_quadratic_by_bits"]
        assert set(quad) == {"4", "8"} and l["omega"] == pytest.approx(quad[str(l["w_bits"])], rel=1e-9)
    trace_out = tmp_path / "mixed_trace"
    assert main(["compile", str(cnn_files["onnx"]), "--calib", str(cnn_files["calib"]), "-o", str(trace_out),
                 "--bits", "4,8", "--size-mb", "0.00115", "--omega", "trace"]) == 0
    mt = json.loads((trace_out / "manifest.json").read_text())
    assert mt["mixed_precision"]["omega"] == "trace" and mt["mixed_precision"]["slack"]["size"] >= 0
    assert all("hessian_quadratic_by_bits" not in l for l in mt["layers"])
    code, err = _run_main(capsys, "compile", cnn_files["onnx"], "--calib", cnn_files["calib"], "-o", tmp_path / "z",
                          "--omega", "trace")
    assert code == 2 and "need --bits" in err
    code, err = _run_main(capsys, "compile", cnn_files["onnx"], "--calib", cnn_files["calib"], "-o", tmp_path / "x",
                          "--bits", "4,8", "--size-mb", "0.0001")
    assert code == 2 and "no assignment meets the budgets" in err
    code, err = _run_main(capsys, "compile", cnn_files["onnx"], "--calib", cnn_files["calib"], "-o", tmp_path / "y",
                          "--size-mb", "1")
    assert code == 2 and "need --bits" in err
