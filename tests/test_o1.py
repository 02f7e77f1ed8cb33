"""O1 Embedder through the worker equals the research definition, computed here the slow way.

The real backbone (float64, greedy) checks the prompt, the thought and its two endings (a
sampled EOS, the K limit); a tiny random Llama (fast) checks sampling, seeds, the averaging of
n samples and the batching, where real weights add nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

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
from tests.models import cosine, embed_all, make_tiny_llama

TOKENS = ["<query>", "</query>", "<thought>", "<emb>"]
TOKEN_IDS = dict(zip(TOKENS, range(49152, 49156), strict=True))  # appended to SmolLM2's 49,152
QUERY = "What is the boiling point of water?"
DOCUMENT = "Water boils at 100 degrees Celsius at sea level."


def _worker(loaded, limits: EngineLimits | None = None, **fields) -> EmbeddingWorker:
    """A worker on an already loaded model (loaded once per module) with spec fields replaced."""
    spec = loaded.spec.model_validate({**loaded.spec.model_dump(), **fields})
    worker = EmbeddingWorker(dataclasses.replace(loaded, spec=spec), limits or EngineLimits())
    worker.engine.start()
    return worker


def _steps_total(worker: EmbeddingWorker) -> float:
    return worker.metrics.registry.get_sample_value("genembed_worker_refinement_steps_total") or 0.0


def _pick(logits: torch.Tensor, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """The next token: argmax at temperature 0; else keep the most likely tokens until their mass
    reaches top_p, renormalise, and walk their cumulative mass to one uniform draw."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, dim=-1).numpy()
    order = np.argsort(-probs, kind="stable")
    kept, mass = [], 0.0
    for token in order:
        if mass >= top_p:
            break
        kept.append(int(token))
        mass += probs[token]
    target, walked = rng.random() * mass, 0.0
    for token in kept:
        walked += probs[token]
        if walked > target:
            return token
    return kept[-1]


@torch.no_grad()
def last_state(model, ids: list[int]) -> torch.Tensor:
    """The final-layer state of the last token, L2-normalised (float64)."""
    state = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].double()
    return state / state.norm()


@torch.no_grad()
def reference_o1(loaded, prompt: str, steps: int, seed: int = 0, samples: int = 1) -> tuple[np.ndarray, list]:
    """O1 the slow, obvious way: no KV cache, the whole sequence re-run for every token; the
    embedding is `<emb>`'s final state after prompt + thought + EOS. Returns (vector, thoughts)."""
    model, tokenizer, spec = loaded.model, loaded.tokenizer, loaded.spec
    eos, emb = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<emb>")
    vectors, thoughts = [], []
    for sample in range(samples):
        rng = np.random.default_rng([seed, sample])
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        thought: list[int] = []
        while len(thought) < steps and eos not in thought:
            last = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            token = _pick(model.lm_head(last), spec.thought_temperature, spec.thought_top_p, rng)
            thought.append(token)
            ids.append(token)
        vectors.append(last_state(model, ids + ([] if eos in thought else [eos]) + [emb]))
        thoughts.append(thought)
    mean = torch.stack(vectors).mean(dim=0)
    return (mean / mean.norm()).numpy(), thoughts


# -- the real backbone, float64, greedy ------------------------------------------------------------


@pytest.fixture(scope="module")
def real64():
    return load_model(load_spec("smollm2-o1", dtype="float64"))


def test_special_tokens_added_with_mean_embeddings(real64):
    tokenizer, weight = real64.tokenizer, real64.model.get_input_embeddings().weight
    ids = tokenizer.convert_tokens_to_ids(TOKENS)
    assert ids == list(TOKEN_IDS.values()) and real64.vocab_size == 49156
    assert torch.equal(weight[ids], weight[:49152].mean(dim=0).expand(4, -1))
    assert tokenizer(f"<query>{QUERY}</query><thought>", add_special_tokens=False)["input_ids"][0] == ids[0]


def test_greedy_matches_from_scratch(real64):
    # The untrained model ends a thought at once after `<thought>`; a few words of template make
    # it write ": <EOS>", so K = 1 ends at the limit and K = 3 at the sampled EOS.
    template = "<query>{text}</query><thought>The answer is"
    worker = _worker(real64, thought_temperature=0.0, templates={"query": template, "document": "{text}"})
    try:
        items = [EmbedItem(text=QUERY, steps=k, samples=4) for k in (0, 1, 3)]
        response = asyncio.run(
            worker.embed(EmbedRequest(items=[*items, EmbedItem(text=DOCUMENT, input_type="document")]))
        )
        prompt = template.replace("{text}", QUERY)
        for row, k in enumerate((0, 1, 3)):
            want, (thought,) = reference_o1(worker.loaded, prompt, k)
            assert len(thought) == min(k, 2) and (k < 3) == (real64.tokenizer.eos_token_id not in thought)
            assert 1 - cosine(response.vectors[row], want) <= 1e-10
        document = real64.tokenizer(DOCUMENT, add_special_tokens=False)["input_ids"] + [TOKEN_IDS["<emb>"]]
        assert 1 - cosine(response.vectors[3], last_state(real64.model, document).numpy()) <= 1e-10
        assert [r.steps for r in response.results] == [0, 1, 3, 0]
        assert response.results[3].prompt_tokens == len(document)
    finally:
        worker.stop()


def test_documents_skip_generation(real64):
    worker = _worker(real64)
    try:
        before = _steps_total(worker)
        response = asyncio.run(
            worker.embed(EmbedRequest(items=[EmbedItem(text=DOCUMENT, input_type="document", steps=9)]))
        )
        assert response.results[0].steps == 0 and _steps_total(worker) == before
    finally:
        worker.stop()


# -- a tiny random Llama, float64, sampled ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    directory = make_tiny_llama(tmp_path_factory.mktemp("tiny-o1"))
    spec = load_spec(
        "smollm2-o1",
        backbone=str(directory),
        backbone_install_hint=None,
        dimensions=None,
        dtype="float64",
        thought_temperature=1.0,
        thought_top_p=0.9,
        thought_samples=2,
    )
    return load_model(spec)


def test_sampled_thoughts_and_averages_match_from_scratch(tiny64):
    # More sequences (samples included) than slots, different K: they join and leave mid-thought.
    worker = _worker(tiny64, EngineLimits(max_running_seqs=3))
    cases = [(QUERY, 4, 5, 3), ("Why is the sky blue?", 1, 6, None), ("Boiling water", 7, 0, 1), (DOCUMENT, 2, 3, 1)]
    try:
        items = [EmbedItem(text=t, steps=k, seed=s, samples=n) for t, k, s, n in cases]
        got = embed_all(worker, items)
        for row, (text, k, seed, n) in enumerate(cases):
            want, thoughts = reference_o1(tiny64, f"<query>{text}</query><thought>", k, seed, n or 2)
            assert all(len(t) == k for t in thoughts)  # a random model never writes EOS this early
            assert 1 - cosine(got[row], want) <= 1e-10
    finally:
        worker.stop()


def test_seed_decides_the_thought(tiny64):
    worker = _worker(tiny64)
    try:
        first, default, again, other = embed_all(
            worker, [EmbedItem(text=QUERY, steps=3, seed=s) for s in (0, None, 0, 1)]
        )
        assert np.array_equal(first, again) and np.array_equal(first, default)
        assert 1 - cosine(first, other) > 1e-3
        prompt = f"<query>{QUERY}</query><thought>"
        assert reference_o1(tiny64, prompt, 3, 0, 2)[1] != reference_o1(tiny64, prompt, 3, 1, 2)[1]
        one, three = embed_all(worker, [EmbedItem(text=QUERY, steps=3, samples=n) for n in (1, 3)])
        assert 1 - cosine(one, three) > 1e-3
    finally:
        worker.stop()


def test_samples_seed_and_steps_are_validated(tiny64):
    spec = tiny64.spec.model_copy(update={"thought_temperature": 0.0})
    prompts = PromptBuilder(spec, tiny64.tokenizer, tiny64.vocab_size)
    for item, code, named in [
        (EmbedItem(text="q", samples=0), "invalid_input", "1..16"),
        (EmbedItem(text="q", samples=17), "invalid_input", "1..16"),
        (EmbedItem(text="q", seed=-1), "invalid_input", "seed"),
        (EmbedItem(text="q", steps=129), "steps_out_of_range", "0..128"),
    ]:
        with pytest.raises(ItemRejected) as caught:
            prompts.prepare(item)
        assert caught.value.error.code == code and named in caught.value.error.message
    # Greedy thoughts are all alike: n samples run once.
    assert prompts.prepare(EmbedItem(text="q", steps=2, samples=5)).samples == 1


def test_checkpoint_with_the_tokens_loads_as_is(tiny64, tmp_path):
    directory = Path(tmp_path / "trained")
    model, tokenizer = tiny64.model, tiny64.tokenizer
    with torch.no_grad():
        model.get_input_embeddings().weight[-4:] = torch.arange(4, dtype=torch.float64)[:, None]
    try:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    finally:
        with torch.no_grad():
            model.get_input_embeddings().weight[-4:] = model.get_input_embeddings().weight[:-4].mean(dim=0)
    loaded = load_model(tiny64.spec.model_copy(update={"backbone": str(directory)}))
    weight = loaded.model.get_input_embeddings().weight
    assert loaded.vocab_size == 49156 and loaded.tokenizer.convert_tokens_to_ids(TOKENS) == list(TOKEN_IDS.values())
    assert torch.equal(weight[-4:], torch.arange(4, dtype=torch.float64)[:, None].expand(4, weight.shape[1]))
