"""GIRCSE through the worker's batching path equals the research definition, on the real backbone."""

from __future__ import annotations

import pytest

from common.protocol import EmbedItem
from model_server.specs import load_spec
from tests.models import cosine, embed_all, reference_gircse, start_worker

INSTRUCTION = "Given a query, retrieve relevant passages that answer the query"
TEXTS = [
    "What is the boiling point of water at sea level?",
    "A mixture of hydrogen and oxygen burns with a pale blue flame.",
]


@pytest.fixture(scope="module")
def worker64():
    worker = start_worker(load_spec("smollm2-gircse", dtype="float64"))
    yield worker
    worker.stop()


@pytest.fixture(scope="module", params=["packed", "eager"])
def worker32(request):
    # fp32 runs both step kernels: projections packed for oneDNN (the CPU default) and torch's F.linear
    worker = start_worker(load_spec("smollm2-gircse", dtype="float32", linear=request.param))
    yield worker
    worker.stop()


def _query_ids(worker, text: str) -> list[int]:
    # Written out here, not taken from the template code: the prompt the paper uses.
    prompt = f"Instruct: {INSTRUCTION}\nQuery:{text}"
    return worker.loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("steps", [0, 1, 5, 20])
def test_float64_matches_from_scratch(worker64, steps):
    # Queries of two lengths with mixed budgets share the batch; each must equal its own reference.
    items = [EmbedItem(text=t, input_type="query", steps=s) for t in TEXTS for s in (steps, 3)]
    got = embed_all(worker64, items)
    model = worker64.loaded.model
    for text_index, text in enumerate(TEXTS):
        want = reference_gircse(model, _query_ids(worker64, text), steps)
        assert 1 - cosine(got[2 * text_index], want) <= 1e-10


def test_documents_are_raw_text(worker64):
    text = TEXTS[1]
    got = embed_all(worker64, [EmbedItem(text=text, input_type="document", steps=2)])[0]
    ids = worker64.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 1 - cosine(got, reference_gircse(worker64.loaded.model, ids, 2)) <= 1e-10


def test_float32_close_to_reference(worker32):
    model = worker32.loaded.model
    for steps in (1, 3, 5):
        items = [EmbedItem(text=t, steps=steps) for t in TEXTS]
        got = embed_all(worker32, items)
        for row, text in enumerate(TEXTS):
            assert cosine(got[row], reference_gircse(model, _query_ids(worker32, text), steps)) >= 0.99999


@pytest.mark.parametrize("steps", [1, 5])
def test_float32_alone_equals_inside_a_mixed_batch(worker32, steps):
    target = EmbedItem(text=TEXTS[0], steps=steps)
    alone = embed_all(worker32, [target])[0]
    crowd = [EmbedItem(text=" ".join([TEXTS[1]] * (1 + i % 3)), steps=k) for i, k in enumerate([0, 8, 2, 4, 1])]
    together = embed_all(worker32, [*crowd[:3], target, *crowd[3:]])[3]
    assert cosine(alone, together) >= 0.99999
    # joining a batch that is already running
    running = [worker32.engine.submit([worker32.method.prompts.prepare(item)])[0] for item in crowd]
    joined = embed_all(worker32, [target])[0]
    assert cosine(alone, joined) >= 0.99999
    for future in running:
        future.result(timeout=120)
