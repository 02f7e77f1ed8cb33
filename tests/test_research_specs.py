"""DEBATER and pooled models served through spec files on random-weight stand-ins of the published backbones'
families (each with a random LoRA adapter), against a from-scratch computation written the way the reference
code computes it; and the published checkpoints' example specs."""

from __future__ import annotations

from pathlib import Path

import httpx
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.protocol import EmbedItem, EmbedRequest, EmbedResponse, ModelInfo
from harness.procs import worker_process
from model_server.loading import ModelLoadError, load_model, resolve_adapter
from model_server.specs import load_spec
from tests.models import embed_all, make_random_lora, make_tiny_decoder, start_worker

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "specs"
FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "minicpm3")
QUERIES = ["What is the boiling point of water?", "why is the sky blue", "Neutron stars"]
DOCUMENTS = [
    "Water boils at 100 degrees Celsius at sea level.",
    "Rayleigh scattering.",
    "A neutron star is the collapsed core of a massive supergiant star, made almost entirely of neutrons.",
]
# DEBATER's strings as its code writes them (OpenBMB/DEBATER: llm2vec_models.py, E5Data.py), written out here.
RESERVED = "".join(f"<reserved_{i}>" for i in range(12, 20))
ASK = " Use eight words to represent the above text in multiple aspects: "
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query:"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(backbone, random LoRA adapter) per family; minicpm3's tokenizer puts BOS first, as MiniCPM's does."""
    root = tmp_path_factory.mktemp("stand-ins")
    made = {}
    for seed, family in enumerate(FAMILIES):
        backbone = make_tiny_decoder(family, root / family, seed=seed)
        if family == "minicpm3":
            AutoTokenizer.from_pretrained(backbone, add_bos_token=True).save_pretrained(backbone)
            assert AutoTokenizer.from_pretrained(backbone)("x")["input_ids"][0] == 1
        made[family] = (backbone, make_random_lora(backbone, root / f"{family}-lora", seed=seed + 10))
    return made


def write_spec(directory: Path, name: str, body: str) -> str:
    path = directory / f"{name}.toml"
    path.write_text(body)
    return str(path)


@torch.no_grad()
def reference_last_token(backbone: Path, adapter: Path, texts: list[str], reserved: str) -> np.ndarray:
    """The reference's encode: the adapter merged, the tokenizer's default special tokens, one left-padded
    batch (pad = EOS), the base model's final states, the last position; L2-normalised."""
    model = AutoModelForCausalLM.from_pretrained(backbone, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    if reserved:  # SmolLM2's tokenizer lacks MiniCPM's reserved tokens: one mean-initialised row each
        tokens = [f"<reserved_{i}>" for i in range(12, 20)]
        known = len(tokenizer)
        tokenizer.add_tokens(tokens, special_tokens=True)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        rows = model.get_input_embeddings().weight
        rows[known:] = rows[:known].mean(dim=0)
    base = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().get_decoder()
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    states = base(**batch).last_hidden_state[:, -1].double()
    return (states / states.norm(dim=-1, keepdim=True)).numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_debater_spec_file_matches_the_reference(family, stand_ins, tmp_path):
    backbone, adapter = stand_ins[family]
    spec = write_spec(
        tmp_path, family, f'id = "d"\nbackbone = "{backbone}"\nadapter = "{adapter}"\nmethod = "debater"\n'
    )
    worker = start_worker(load_spec(spec, dtype="float32"))
    try:
        got = embed_all(
            worker,
            [EmbedItem(text=q) for q in QUERIES] + [EmbedItem(text=d, input_type="document") for d in DOCUMENTS],
        )
    finally:
        worker.stop()
    tokenizer_has_reserved = "<reserved_12>" in AutoTokenizer.from_pretrained(backbone).get_vocab()
    want = reference_last_token(
        backbone,
        adapter,
        [f"{INSTRUCTION} {q}</s>" for q in QUERIES] + [d + ASK + RESERVED for d in DOCUMENTS],
        "" if tokenizer_has_reserved else RESERVED,
    )
    np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize(("family", "pooling"), [("qwen2", "last"), ("minicpm3", "mean")])
def test_pooled_decoder_spec_file_matches_plain_forward(family, pooling, stand_ins, tmp_path):
    backbone, adapter = stand_ins[family]
    body = f'id = "p"\nbackbone = "{backbone}"\nadapter = "{adapter}"\nmethod = "pooled"\npooling = "{pooling}"\n'
    worker = start_worker(load_spec(write_spec(tmp_path, family, body), dtype="float32"))
    try:
        got = embed_all(worker, [EmbedItem(text=t, input_type="document") for t in DOCUMENTS])
    finally:
        worker.stop()
    model = AutoModelForCausalLM.from_pretrained(backbone, dtype=torch.float32)
    base = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().get_decoder()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    with torch.no_grad():
        for row, text in enumerate(DOCUMENTS):  # one at a time: no padding at all
            states = base(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].double()
            want = states[-1] if pooling == "last" else states.mean(dim=0)
            np.testing.assert_allclose(got[row], (want / want.norm()).numpy(), atol=2e-6)


def test_debater_minicpm3_through_a_worker_process(stand_ins, tmp_path):
    backbone, adapter = stand_ins["minicpm3"]
    spec = write_spec(
        tmp_path, "minicpm3", f'id = "d"\nbackbone = "{backbone}"\nadapter = "{adapter}"\nmethod = "debater"\n'
    )
    with worker_process(spec, tmp_path, "--dtype", "float32") as (url, _):
        info = ModelInfo(**httpx.get(f"{url}/info").json())
        assert (info.method, info.min_refinement_steps, info.max_refinement_steps) == ("debater", 1, 8)
        items = [EmbedItem(text=QUERIES[0]), EmbedItem(text=DOCUMENTS[2], input_type="document")]
        reply = httpx.post(f"{url}/embed", content=EmbedRequest(items=items).encode(), timeout=60)
        assert reply.status_code == 200, reply.text
        got = EmbedResponse.decode(reply.content).vectors
    want = reference_last_token(
        backbone, adapter, [f"{INSTRUCTION} {QUERIES[0]}</s>", DOCUMENTS[2] + ASK + RESERVED], RESERVED
    )
    np.testing.assert_allclose(got, want, atol=2e-6)


# -- the published checkpoints' specs -------------------------------------------------------------------


def test_every_example_spec_parses():
    specs = {path.stem: load_spec(str(path)) for path in sorted(EXAMPLES.glob("*.toml"))}
    assert set(specs) == {"gircse-mistral7b", "gircse-qwen7b", "debater-2b", "debater-4b"}
    for name, spec in specs.items():
        assert spec.id == name and spec.adapter and spec.dimensions
    assert specs["gircse-qwen7b"].templates.query == "Instruct: {instruction}\nQuery:{text}"
    assert specs["debater-4b"].deliberation_tokens == [f"<reserved_{i}>" for i in range(12, 20)]
    assert specs["debater-2b"].trust_remote_code and not specs["debater-4b"].trust_remote_code
    assert (specs["debater-2b"].adapter, specs["gircse-mistral7b"].adapter) == (
        "bigtailwolf/DEBATER-2B",
        "Roytsai27/GIRCSE-Mistral7B",
    )


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network and an empty hub cache: nothing is downloaded, nothing is found."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))


@pytest.mark.parametrize("name", ["gircse-mistral7b", "gircse-qwen7b", "debater-2b", "debater-4b"])
def test_published_specs_fail_offline_naming_what_to_do(name, offline_hub):
    spec = load_spec(str(EXAMPLES / f"{name}.toml"))
    for load, hub_id in ((load_model, spec.backbone), (resolve_adapter, spec.adapter)):
        with pytest.raises(ModelLoadError) as caught:
            load(spec)
        message = str(caught.value)
        assert repr(hub_id) in message and "HF_TOKEN" in message and "HF_HUB_OFFLINE" in message
        assert "local directory" in message
