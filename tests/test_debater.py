"""DEBATER through the worker equals the research code's computation on the real backbone (float64)."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch

from common.protocol import EmbedItem, EmbedRequest
from common.rules import ItemRejected
from model_server.engine import EngineLimits
from model_server.loading import load_model
from model_server.prompts import PromptBuilder
from model_server.serving import EmbeddingWorker
from model_server.specs import load_spec
from tests.models import cosine

QUERY = "What is the boiling point of water?"
DOCUMENT = "Water boils at 100 degrees Celsius at sea level."
# Written out here, not taken from the method: the reference's strings (OpenBMB/DEBATER, llm2vec_models.py).
RESERVED = [f"<reserved_{i}>" for i in range(12, 20)]
ASK = " Use eight words to represent the above text in multiple aspects: "
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query:"


@pytest.fixture(scope="module")
def loaded():
    return load_model(load_spec("smollm2-debater", dtype="float64"))


@pytest.fixture(scope="module")
def worker(loaded):
    worker = EmbeddingWorker(loaded, EngineLimits())
    worker.engine.start()
    yield worker
    worker.stop()


@torch.no_grad()
def last_state(model, ids: list[int]):
    """The final-layer state of the last token, L2-normalised: the slow, obvious way."""
    state = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].double()
    return (state / state.norm()).numpy()


def _ids(loaded, text: str) -> list[int]:
    return loaded.tokenizer(text)["input_ids"]  # the tokenizer's default special tokens, as the reference


def test_float64_matches_from_scratch(loaded, worker):
    reserved = loaded.tokenizer.convert_tokens_to_ids(RESERVED)
    assert reserved == list(range(49152, 49160))  # SmolLM2 lacks them: added at load
    cases = [
        (EmbedItem(text=QUERY), _ids(loaded, f"{INSTRUCTION} {QUERY}</s>")),
        (EmbedItem(text=QUERY, instruction=""), _ids(loaded, f"{QUERY}</s>")),
        *(
            (
                EmbedItem(text=DOCUMENT, input_type="document", steps=k),
                _ids(loaded, DOCUMENT + ASK + "".join(RESERVED[:k])),
            )
            for k in (8, 3, 1)
        ),
    ]
    response = asyncio.run(worker.embed(EmbedRequest(items=[item for item, _ in cases])))
    for row, (_, ids) in enumerate(cases):
        assert response.results[row].prompt_tokens == len(ids)
        assert 1 - cosine(response.vectors[row], last_state(loaded.model, ids)) <= 1e-10
    assert [r.steps for r in response.results] == [0, 0, 8, 3, 1]
    assert 1 - cosine(response.vectors[2], response.vectors[3]) > 1e-6  # K changes the vector


def test_k_selects_the_deliberation_tokens(loaded, worker):
    reserved = loaded.tokenizer.convert_tokens_to_ids(RESERVED)
    for k in range(1, 9):
        ids = worker.method.prompts.prepare(EmbedItem(text=DOCUMENT, input_type="document", steps=k)).token_ids
        assert ids[-k:] == reserved[:k] and not set(ids[:-k]) & set(reserved)
    for k in (0, 9):
        with pytest.raises(ItemRejected) as caught:
            worker.method.prompts.prepare(EmbedItem(text=DOCUMENT, input_type="document", steps=k))
        assert caught.value.error.code == "steps_out_of_range" and "1..8" in caught.value.error.message


def test_long_document_is_cut_in_the_body_never_the_suffix(loaded):
    spec = loaded.spec.model_copy(update={"max_input_tokens": 40})
    worker = EmbeddingWorker(dataclasses.replace(loaded, spec=spec), EngineLimits())
    worker.engine.start()
    suffix = _ids(loaded, ASK + "".join(RESERVED))[-21:]  # " Use … aspects: " and the 8 reserved tokens
    assert suffix[-8:] == loaded.tokenizer.convert_tokens_to_ids(RESERVED)
    body = " ".join([DOCUMENT] * 10)
    try:
        for item in (
            EmbedItem(text=body, input_type="document", steps=8),
            EmbedItem(token_ids=_ids(loaded, body), input_type="document", steps=8),
        ):
            prepared = worker.method.prompts.prepare(item)
            ids = prepared.token_ids
            assert prepared.truncated and len(ids) == 40
            assert ids[-21:] == suffix and ids[:19] == _ids(loaded, body)[:19]
        response = asyncio.run(worker.embed(EmbedRequest(items=[item])))
        assert response.results[0].truncated
        assert 1 - cosine(response.vectors[0], last_state(loaded.model, ids)) <= 1e-10
        refused = PromptBuilder(spec, loaded.tokenizer, loaded.vocab_size)
        with pytest.raises(ItemRejected, match="40"):
            refused.prepare(EmbedItem(text=body, input_type="document", truncate=False))
    finally:
        worker.stop()


def test_trajectory_is_every_deliberation_state(loaded, worker):
    """`trajectory` (max-sim users): row i is what K = i gives, all from the K = 8 pass; queries have none."""
    items = [
        EmbedItem(text=DOCUMENT, input_type="document", steps=8, trajectory=True),
        *(EmbedItem(text=DOCUMENT, input_type="document", steps=k) for k in range(1, 9)),
        EmbedItem(text=QUERY, trajectory=True),
    ]
    response = asyncio.run(worker.embed(EmbedRequest(items=items)))
    outputs = response.outputs()
    vector, rows = outputs[0]
    assert [r.trajectory for r in response.results] == [8, *[0] * 8, 0]
    assert rows.shape == (8, loaded.dimension) and np.array_equal(rows[-1], vector)
    for k in range(1, 9):
        assert 1 - cosine(rows[k - 1], outputs[k][0]) <= 1e-10
    assert outputs[-1][1].shape == (0, loaded.dimension)


def test_auto_steps_are_refused(worker):
    response = asyncio.run(worker.embed(EmbedRequest(items=[EmbedItem(text=DOCUMENT, steps=8, tolerance=1e-3)])))
    error = response.results[0].error
    assert error.code == "invalid_input" and error.param == "refinement_steps" and "gircse" in error.message
