"""Model helpers for tests: the real default backbone, tiny random Llamas, and the slow references."""

from __future__ import annotations

import asyncio
import functools
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model_server.engine import EngineLimits
from model_server.loading import resolve_backbone
from model_server.protocol import EmbedItem, EmbedRequest
from model_server.serving import EmbeddingWorker
from model_server.specs import ModelSpec, load_spec


@functools.cache
def default_backbone_dir() -> Path:
    """The safetensors copy of the bundled SmolLM2 (converted from its GGUF on first use)."""
    return resolve_backbone(load_spec("smollm2-gircse")).directory


def make_tiny_llama(directory: Path, seed: int = 0, **config) -> Path:
    """A random Llama with grouped-query attention, sharing the default model's tokenizer."""
    torch.manual_seed(seed)
    defaults = dict(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(LlamaConfig(**{**defaults, **config}))
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = default_backbone_dir() / name
        if source.exists():
            shutil.copy(source, directory / name)
    return directory


def gircse_spec(backbone: Path | str, **fields) -> ModelSpec:
    base = load_spec("smollm2-gircse-base").model_dump()
    base.update(backbone=str(backbone), dimensions=None, backbone_install_hint=None)
    base.update(fields)
    return ModelSpec.model_validate(base)


def embed_all(worker: EmbeddingWorker, items: list[EmbedItem]) -> np.ndarray:
    response = asyncio.run(worker.embed(EmbedRequest(items=items)))
    errors = [r.error for r in response.results if r.error]
    assert not errors, errors
    return response.vectors


def start_worker(spec: ModelSpec, **limits) -> EmbeddingWorker:
    return EmbeddingWorker.load(spec, EngineLimits(**limits))


@torch.no_grad()
def reference_gircse(model, token_ids: list[int], steps: int, temperature: float = 1.0) -> np.ndarray:
    """GIRCSE the slow, obvious way: no KV cache, the whole sequence re-run at every step."""
    embed = model.get_input_embeddings().weight
    sequence = embed[torch.tensor(token_ids)][None]
    states = []
    for step in range(steps + 1):
        hidden = model.model(inputs_embeds=sequence).last_hidden_state[0]
        if steps == 0:
            vector = hidden.mean(dim=0)
            break
        if step > 0:
            states.append(hidden[-1])
        if step == steps:
            vector = torch.stack(states).mean(dim=0)
            break
        logits = model.lm_head(hidden[-1])
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
        soft = probs.to(embed.dtype) @ embed
        sequence = torch.cat([sequence, soft[None, None]], dim=1)
    vector = vector.double()
    return (vector / vector.norm()).numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
