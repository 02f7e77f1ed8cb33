"""Model helpers for tests: the real default backbone, tiny random decoders and adapters, and the slow references."""

from __future__ import annotations

import asyncio
import functools
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MiniCPM3Config,
    MiniCPM3ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from common.protocol import EmbedItem, EmbedRequest
from model_server.engine import EngineLimits
from model_server.loading import resolve_backbone
from model_server.serving import EmbeddingWorker
from model_server.specs import ModelSpec, load_spec


@functools.cache
def default_backbone_dir() -> Path:
    """The safetensors copy of the bundled SmolLM2 (converted from its GGUF on first use)."""
    return resolve_backbone(load_spec("smollm2-gircse")).directory


def _save_with_default_tokenizer(model: PreTrainedModel, directory: Path) -> Path:
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = default_backbone_dir() / name
        if source.exists():
            shutil.copy(source, directory / name)
    return directory


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
    return _save_with_default_tokenizer(LlamaForCausalLM(LlamaConfig(**{**defaults, **config})), directory)


_SHARED = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=1024
)
#: One small config per family, each exercising what sets the family apart from Llama.
TINY_FAMILIES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict]] = {
    # tied embeddings, as SmolLM2's
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    # untied head, as Mistral-7B's; a sliding window wider than any test prompt
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=512, tie_word_embeddings=False),
    ),
    # q/k/v biases (made non-zero below), as Qwen2.5's
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_attention_heads=4, num_key_value_heads=2)),
    # q/k norms and a head_dim that is not hidden / heads
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
    # multi-head latent attention, scaled embeddings, residuals and logits (the fast runner lacks it)
    "minicpm3": (
        MiniCPM3Config,
        MiniCPM3ForCausalLM,
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=16,
            dim_model_base=32,
            scale_emb=4,
        ),
    ),
}


def make_tiny_decoder(family: str, directory: Path, seed: int = 0) -> Path:
    """A random-weight stand-in of a published backbone's family, sharing the default model's tokenizer."""
    config_class, model_class, fields = TINY_FAMILIES[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**_SHARED, **fields}))
    if family == "qwen2":  # Qwen2 initialises its q/k/v biases at zero, which would hide a missing bias
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(std=0.5)
    return _save_with_default_tokenizer(model, directory)


def make_random_lora(model_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A peft LoRA adapter (r 4) on every linear layer of the decoder blocks, with random non-zero B
    (peft initialises B at zero, which would leave the model unchanged and a dropped adapter unseen)."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    targets = sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.get_decoder().layers.named_modules() if isinstance(m, nn.Linear)}
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    peft_model.save_pretrained(out_dir)
    return out_dir


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
