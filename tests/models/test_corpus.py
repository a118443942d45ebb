from qcompiler.models import corpus


def test_corpus_is_large_deterministic_and_disjoint():
    """The corpus has >= 1000 sentences, repeats itself, and calibration/evaluation never overlap."""
    all_ = corpus.sentences()
    assert len(all_) >= 1000 and len(set(all_)) == len(all_)
    assert corpus.sentences(10) == all_[:10]
    corpus._all.cache_clear()
    corpus._shuffled.cache_clear()
    assert corpus.sentences() == all_
    calib, evals = corpus.calibration_sentences(64), corpus.evaluation_sentences(256)
    assert len(calib) == 64 and len(evals) == 256
    assert not set(corpus.calibration_sentences(10**6)) & set(corpus.evaluation_sentences(10**6))
    assert corpus.calibration_sentences(64) == calib and corpus.evaluation_sentences(8) == evals[:8]
    assert all(6 <= len(s.split()) <= 40 and s == " ".join(s.split()) for s in all_)
