"""Every decoder family the published checkpoints use, served from a spec file (backbone + LoRA adapter +
method) and checked against a from-scratch computation written the way the research code computes it.

The references load the backbone and merge the adapter with plain Hugging Face / peft calls and run the
model's own forward (no engine, no runner): GIRCSE as Roytsai27/GIRCSE's `encode` (prompt embeddings, then
soft tokens `softmax(logits) @ E` fed as `inputs_embeds` over `past_key_values`, mean of the step states);
O1 as RuiranYan/o1embedder (a `generate` thought closed with EOS, then `<emb>` and the last token's state).
llama, mistral, qwen2 and qwen3 run on the fast runner, minicpm3 on the HF fallback.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.methods import o1
from common.protocol import EmbedItem, EmbedRequest, EmbedResponse, ModelInfo
from harness.procs import worker_process
from model_server.specs import load_spec
from tests.models import TINY_FAMILIES, cosine, embed_all, make_random_lora, make_tiny_decoder, start_worker
from tests.test_o1 import last_state

INSTRUCTION = "Given a query, retrieve relevant passages that answer the query"
QUERIES = ["What is the boiling point of water at sea level?", "who wrote the iliad"]
DOCUMENT = "A mixture of hydrogen and oxygen burns with a pale blue flame."
FAST = {"llama", "mistral", "qwen2", "qwen3"}


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def write_spec(
    root: Path, family: str, method: str, backbone: Path, adapter: Path, templates: dict[str, str], **fields: object
) -> Path:
    """A spec file as a user writes one (TOML): backbone + adapter + method, fp32 on the CPU, the reference's
    prompts spelled out."""
    values = dict(id=f"{family}-{method}", backbone=str(backbone), adapter=str(adapter), method=method, dtype="float32")
    values |= dict(device="cpu", max_input_tokens=128, **fields)
    lines = [f"{key} = {_toml(value)}" for key, value in values.items()]
    lines += ["[templates]", *(f"{key} = {_toml(value)}" for key, value in templates.items())]
    path = root / "spec.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _checkpoint(root: Path, family: str, extra_tokens: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A tiny random `family` backbone (with `extra_tokens` in its vocabulary, as a checkpoint trained with
    them has) and a random LoRA adapter on it."""
    backbone = make_tiny_decoder(family, root / "backbone", seed=3)
    if extra_tokens:
        tokenizer = AutoTokenizer.from_pretrained(backbone)
        tokenizer.add_tokens(list(extra_tokens), special_tokens=True)
        model = AutoModelForCausalLM.from_pretrained(backbone)
        torch.manual_seed(4)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.save_pretrained(backbone)
        tokenizer.save_pretrained(backbone)
    return backbone, make_random_lora(backbone, root / "adapter", seed=5)


def reference_model(backbone: Path, adapter: Path) -> torch.nn.Module:
    """The backbone with the adapter merged, by plain transformers + peft calls (fp32)."""
    model = AutoModelForCausalLM.from_pretrained(backbone, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()


@torch.no_grad()
def reference_gircse_cached(model, ids: list[int], steps: int) -> np.ndarray:
    """GIRCSE's `encode` as the reference runs it: the whole prompt, then one soft token per step through
    the causal LM's forward over its KV cache; the mean of the K step states (the prompt's not pooled)."""
    embedding = model.get_input_embeddings()
    inputs = embedding(torch.tensor([ids]))
    cache, states = None, []
    for _ in range(steps + 1):
        out = model(
            inputs_embeds=inputs if cache is None else inputs[:, -1:],
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        states.append(out.hidden_states[-1][0, -1])
        soft = torch.softmax(out.logits[0, -1].float(), dim=-1) @ embedding.weight
        inputs = torch.cat([inputs, soft[None, None]], dim=1)
        cache = out.past_key_values
    vector = torch.stack(states[1:]).mean(dim=0).double()
    return (vector / vector.norm()).numpy()


@torch.no_grad()
def reference_o1_greedy(model, tokenizer, query: str, budget: int) -> np.ndarray:
    """O1 Embedder's query path at temperature 0: a greedy `generate` thought closed with EOS, `<emb>`
    appended, the last token's final state. The reference decodes the thought to text and re-tokenizes it;
    that is these ids wherever the text round-trips (a random model's thought such as " glue" + "desc"
    re-merges as " gluedesc"; genembed keeps the generated ids, as the module docstring of o1.py says)."""
    prompt = tokenizer(f"<query>{query}</query><thought>", return_tensors="pt")
    eos = tokenizer.eos_token_id
    generated = model.generate(**prompt, max_new_tokens=budget, do_sample=False, eos_token_id=eos, pad_token_id=0)
    ids = generated[0].tolist()
    if ids[-1] != eos:
        ids.append(eos)
    return last_state(model, [*ids, tokenizer.convert_tokens_to_ids("<emb>")]).numpy()


@pytest.fixture(scope="module")
def gircse_files(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """Per family: (spec file, backbone, adapter) for gircse."""
    files = {}
    for family in TINY_FAMILIES:
        root = tmp_path_factory.mktemp(f"gircse-{family}")
        backbone, adapter = _checkpoint(root, family)
        templates = {"query": "Instruct: {instruction}\nQuery:{text}", "document": "{text}"}
        spec = write_spec(
            root,
            family,
            "gircse",
            backbone,
            adapter,
            templates,
            default_instruction=INSTRUCTION,
            max_refinement_steps=8,
            default_refinement_steps=5,
        )
        files[family] = (spec, backbone, adapter)
    return files


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_gircse_matches_the_reference(gircse_files, family):
    spec_path, backbone, adapter = gircse_files[family]
    worker = start_worker(load_spec(str(spec_path)))
    try:
        assert worker.info().runner == ("fast" if family in FAST else "hf")
        tokenizer = worker.loaded.tokenizer
        model = reference_model(backbone, adapter)
        for steps in (1, 5):
            # queries of two lengths and a document share the engine's batches, with another budget mixed in
            items = [EmbedItem(text=q, steps=steps) for q in QUERIES]
            items += [EmbedItem(text=DOCUMENT, input_type="document", steps=steps), EmbedItem(text=DOCUMENT, steps=3)]
            got = embed_all(worker, items)
            prompts = [f"Instruct: {INSTRUCTION}\nQuery:{q}" for q in QUERIES] + [DOCUMENT]
            for row, prompt in enumerate(prompts):
                ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                assert cosine(got[row], reference_gircse_cached(model, ids, steps)) >= 0.99999, (family, steps, row)
    finally:
        worker.stop()


@pytest.mark.parametrize("family", ["llama", "minicpm3"])
def test_o1_greedy_equals_generate_then_the_reference_embedding(tmp_path, family):
    backbone, adapter = _checkpoint(tmp_path, family, extra_tokens=o1.TOKENS)
    templates = {"query": "<query>{text}</query><thought>", "document": "{text}"}
    spec_path = write_spec(
        tmp_path,
        family,
        "o1",
        backbone,
        adapter,
        templates,
        thought_temperature=0.0,
        thought_samples=1,
        max_refinement_steps=12,
        default_refinement_steps=12,
    )
    worker = start_worker(load_spec(str(spec_path)))
    try:
        assert worker.info().runner == ("fast" if family in FAST else "hf")
        tokenizer = worker.loaded.tokenizer
        assert len(tokenizer) == len(AutoTokenizer.from_pretrained(backbone))  # the checkpoint's tokens, none added
        model = reference_model(backbone, adapter)
        for budget in (1, 12):
            got = embed_all(worker, [EmbedItem(text=q, steps=budget) for q in QUERIES])
            for row, query in enumerate(QUERIES):
                want = reference_o1_greedy(model, tokenizer, query, budget)
                assert cosine(got[row], want) >= 0.99999, (family, budget, query)
        # documents: text + <emb>, one pass
        doc = embed_all(worker, [EmbedItem(text=DOCUMENT, input_type="document")])[0]
        ids = tokenizer(DOCUMENT)["input_ids"] + [tokenizer.convert_tokens_to_ids("<emb>")]
        assert cosine(doc, last_state(model, ids).numpy()) >= 0.99999
    finally:
        worker.stop()


def test_fallback_family_through_a_worker_process(gircse_files, tmp_path):
    """A real `genembed worker` on the minicpm3 spec file: `/info` names the HF runner, `/embed` serves
    what the reference computes."""
    spec_path, backbone, adapter = gircse_files["minicpm3"]
    with worker_process(str(spec_path), tmp_path) as (url, _):
        info = ModelInfo(**httpx.get(f"{url}/info", timeout=30).json())
        assert (info.id, info.runner) == ("minicpm3-gircse", "hf")
        request = EmbedRequest(items=[EmbedItem(text=q, steps=5) for q in QUERIES])
        response = EmbedResponse.decode(httpx.post(f"{url}/embed", content=request.encode(), timeout=120).content)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = reference_model(backbone, adapter)
    for row, query in enumerate(QUERIES):
        ids = tokenizer(f"Instruct: {INSTRUCTION}\nQuery:{query}", add_special_tokens=False)["input_ids"]
        assert cosine(response.vectors[row], reference_gircse_cached(model, ids, 5)) >= 0.99999


def test_info_leaves_the_runner_out_at_its_default():
    """Rolling upgrades: an older gateway reads the `/info` of a fast-runner worker unchanged."""
    info = ModelInfo("m", "gircse", 8, 0, 20, 5, 512, 100, "float32", "cpu", "rev")
    assert "runner" not in info.to_json()
    assert ModelInfo(**info.to_json()) == info
    hf = ModelInfo(**{**info.to_json(), "runner": "hf"})
    assert hf.to_json()["runner"] == "hf"
