import numpy as np
import pytest

from qcompiler.errors import QCError
from qcompiler.models import fashion
from qcompiler.models._common import load_npz, predict


@pytest.fixture(scope="module")
def data():
    try:
        fashion.data_dir()
    except QCError:
        pytest.skip("Fashion-MNIST is not installed (run `make data`)")
    return {s: fashion.load_fashion_mnist(s) for s in ("train", "test")}


def test_loader_shapes_and_ranges(data):
    """Both splits load as float32 [N,1,28,28] in [0,1] and int64 labels 0..9."""
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = data[split]
        assert x.shape == (n, 1, 28, 28) and x.dtype == np.float32 and y.shape == (n,) and y.dtype == np.int64
        assert x.min() == 0.0 and x.max() == 1.0
        assert set(np.unique(y)) == set(range(10))


def test_missing_data_names_make_data(monkeypatch, tmp_path):
    """Without the data anywhere, the error says to run `make data`."""
    monkeypatch.setattr(fashion, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QC_FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(fashion, "SYSTEM_DIR", tmp_path)
    with pytest.raises(QCError, match="make data"):
        fashion.data_dir()


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_committed_weights_reach_recorded_accuracy(data, name):
    """The committed weights score within 1.5 points of their recorded top-1 on the first 2000 test images."""
    x, y = data["test"]
    acc = (predict(fashion.load_fashion(name), x[:2000]) == y[:2000]).mean()
    assert abs(acc - fashion.TEST_TOP1[name]) <= 0.015


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_training_recipe_runs(data, name, tmp_path):
    """Three optimizer steps of the recipe run and write loadable .npz weights."""
    model, top1 = fashion.train(name, epochs=1, steps=3, out=tmp_path / "w.npz")
    assert 0.0 <= top1 <= 1.0
    with np.load(tmp_path / "w.npz", allow_pickle=False) as z:
        assert set(z.files) == set(model.state_dict())
    load_npz(fashion.ARCHS[name](), tmp_path / "w.npz")


def test_param_counts():
    """The architectures have the sizes the docs state (~468 k CNN, ~307 k ViT)."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(fashion.FashionCNN()) == 468010 and count(fashion.FashionViT()) == 306826
