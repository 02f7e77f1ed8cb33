"""Each request rule is written once (common/rules.py): the gateway's early check against a worker's /info
card and the worker's own check of the item break it with the same message, param and code (the gateway answers
a generic `invalid_input` as its `invalid_request`; a token id's message names its input)."""

from __future__ import annotations

import dataclasses

import pytest

from common.protocol import EmbedItem, ItemError, ModelInfo
from common.rules import ItemRejected
from model_server.engine import EngineLimits
from model_server.loading import load_model
from model_server.serving import EmbeddingWorker
from model_server.specs import load_spec
from service.embedder import Embedder, EmbedOptions
from service.errors import InvalidRequest
from tests.models import make_tiny_llama

VOCAB = 49156  # SmolLM2's 49,152 and o1's four tokens


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> dict[str, EmbeddingWorker]:
    """An unstarted worker per method on one tiny random Llama (rules need no forward pass)."""
    directory = make_tiny_llama(tmp_path_factory.mktemp("tiny-rules"))
    loaded = load_model(
        load_spec("smollm2-o1", backbone=str(directory), backbone_install_hint=None, dimensions=None, dtype="float32")
    )
    gircse = load_spec("smollm2-gircse", backbone=str(directory), backbone_install_hint=None, dimensions=None)
    return {
        "o1": EmbeddingWorker(loaded, EngineLimits()),
        "gircse": EmbeddingWorker(dataclasses.replace(loaded, spec=gircse), EngineLimits()),
    }


@pytest.mark.parametrize(
    ("method", "options", "item", "code", "words"),
    [
        ("gircse", EmbedOptions(refinement_steps=21), EmbedItem(steps=21), "steps_out_of_range", "0..20"),
        ("gircse", EmbedOptions(refinement_steps=(-1, 5)), EmbedItem(steps=-1), "steps_out_of_range", "=-1 "),
        ("gircse", EmbedOptions(samples=2), EmbedItem(samples=2), "invalid_input", "only for o1"),
        ("o1", EmbedOptions(refinement_steps="auto"), EmbedItem(tolerance=1e-3), "invalid_input", "only for gircse"),
        ("o1", EmbedOptions(trajectory=True), EmbedItem(trajectory=True), "invalid_input", "not available for o1"),
        ("o1", EmbedOptions(samples=17), EmbedItem(samples=17), "invalid_input", "1..16"),
        ("o1", EmbedOptions(seed=-1), EmbedItem(seed=-1), "invalid_input", "non-negative"),
    ],
)
def test_gateway_and_worker_break_a_rule_alike(workers, method, options, item, code, words):
    worker = workers[method]
    want = _worker_error(worker, dataclasses.replace(item, text="a query"))
    got = _gateway_error(worker.info(), ["a query"], options)
    assert want.code == code and words in want.message
    assert got == (want.message, want.param, "invalid_request" if code == "invalid_input" else code)


def test_token_ids_outside_the_vocabulary(workers):
    worker = workers["gircse"]
    want = _worker_error(worker, EmbedItem(token_ids=[5, VOCAB]))
    got = _gateway_error(worker.info(), [[5], [5, VOCAB]], EmbedOptions())
    assert want.code == "token_out_of_vocabulary" and f"(0..{VOCAB - 1})" in want.message
    assert got == (f"input[1]: {want.message}", want.param, want.code)


def test_the_card_carries_the_samples_range_of_o1_models_only(workers):
    o1, gircse = workers["o1"].info(), workers["gircse"].info()
    assert o1.max_thought_samples == 16 and ModelInfo(**o1.to_json()) == o1
    assert gircse.max_thought_samples is None and "max_thought_samples" not in gircse.to_json()
    # a worker older than the field: the gateway leaves the range to it
    older = ModelInfo(**{k: v for k, v in o1.to_json().items() if k != "max_thought_samples"})
    assert Embedder._items("m", older, ["q"], EmbedOptions(samples=17))[0].samples == 17


def _worker_error(worker: EmbeddingWorker, item: EmbedItem) -> ItemError:
    with pytest.raises(ItemRejected) as caught:
        worker.method.prompts.prepare(item)
    return caught.value.error


def _gateway_error(info: ModelInfo, inputs: list, options: EmbedOptions) -> tuple[str, str | None, str | None]:
    with pytest.raises(InvalidRequest) as caught:
        Embedder._items(info.id, info, inputs, options)
    return caught.value.message, caught.value.param, caught.value.code
