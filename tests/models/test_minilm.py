import numpy as np
import pytest
import torch

from qcompiler.errors import QCError
from qcompiler.models import corpus
from qcompiler.models.minilm import encode, load_minilm, model_path, tokenize


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_matches_transformers(minilm):
    """Plain-torch MiniLM equals transformers' BertModel mean-pooled + normalised (cosine >= 0.99999)."""
    transformers = pytest.importorskip("transformers")
    sents = corpus.evaluation_sentences(8)
    t = tokenize(sents)
    ids, mask = torch.from_numpy(t["input_ids"]), torch.from_numpy(t["attention_mask"])
    hf = transformers.AutoModel.from_pretrained(str(model_path())).eval()
    with torch.no_grad():
        h = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = minilm(ids, mask)
    m = mask.unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)
    assert ours.shape == (8, 384) and ours.dtype == torch.float32
    assert (ours * ref).sum(1).min().item() >= 0.99999


def test_tokenize_pads_to_longest_and_truncates():
    """tokenize pads to the longest sentence of the batch and truncates at max_len."""
    t = tokenize(["short one.", "a somewhat longer sentence than the first."])
    assert set(t) == {"input_ids", "attention_mask"}
    assert t["input_ids"].dtype == np.int64 and t["attention_mask"].dtype == np.int64
    assert t["input_ids"].shape == t["attention_mask"].shape and t["input_ids"].shape[0] == 2
    assert t["attention_mask"][1].all() and not t["attention_mask"][0].all()
    assert (t["input_ids"][t["attention_mask"] == 0] == 0).all()
    assert tokenize(["word " * 500], max_len=128)["input_ids"].shape == (1, 128)
    with pytest.raises(QCError):
        tokenize([])


def test_padding_does_not_change_embedding(minilm):
    """A sentence's embedding does not depend on how much padding its batch adds."""
    s = "Return the number of items in a container."
    alone = encode(minilm, [s])
    padded = encode(minilm, [s, "A much longer companion sentence that forces plenty of padding onto the first one."])
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(padded, axis=1), 1.0, atol=1e-6)
