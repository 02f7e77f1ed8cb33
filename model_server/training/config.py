"""The settings of one ICR training run, and the `genembed train` flags generated from them.

Kept free of torch so the CLI can build its parser without loading the model stack.
"""

from __future__ import annotations

import argparse
import shlex
import types
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, FilePath

from model_server.specs import DEFAULT_MODEL

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: fields that may change when a run resumes: they do not change what is computed
RUNTIME_FIELDS = frozenset({"resume", "threads", "save_every"})


class TrainConfig(BaseModel):
    """Defaults follow the GIRCSE recipe (LoRA r16 α64 on all projections, K=5, InfoNCE τ=0.02,
    regulariser weight 1) except the learning rate: a short run needs more than the paper's 1e-5."""

    model_config = ConfigDict(extra="forbid")

    data: FilePath = Field(
        description="training pairs, JSONL: {query, document[, negatives]} (see `python -m model_server.training.data`)"
    )
    output_dir: Path = Field(description="run directory: adapter/, checkpoint/, losses.jsonl, config.json")
    model: str = Field(
        default=DEFAULT_MODEL,
        description="spec whose backbone, templates and soft-token temperature the adapter is trained for "
        "(a spec's own adapter is ignored: training starts from its backbone)",
    )
    refinement_steps: int = Field(default=5, ge=1, description="K, soft-token steps per input during training")
    steps: int = Field(default=1000, ge=1, description="optimizer steps")
    batch_size: int = Field(default=16, ge=2, description="queries per micro-batch (in-batch negatives)")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(default=2e-4, gt=0, description="peak learning rate (AdamW; linear warm-up and decay)")
    warmup_steps: int = Field(default=30, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    contrastive_temperature: float = Field(default=0.02, gt=0, description="InfoNCE temperature")
    reg_weight: float = Field(default=1.0, ge=0, description="weight of mean(ReLU(log L_{i+1} - log L_i))")
    hard_negatives: int = Field(default=0, ge=0, description="hard negatives per query taken from the data")
    query_max_tokens: int = Field(default=64, ge=1, description="prompt tokens of a query (body truncated)")
    document_max_tokens: int = Field(default=128, ge=1, description="tokens of a document (body truncated)")
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=64, ge=1)
    lora_dropout: float = Field(default=0.1, ge=0, lt=1)
    lora_target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto: bf16 autocast on CUDA, fp32 on CPU (where bf16 trains slower)"
    )
    gradient_checkpointing: bool = Field(
        default=False, description="less memory, ~K+1 times the compute (no KV cache across soft-token steps)"
    )
    device: str = Field(default="auto", description="cpu, cuda, cuda:1 (auto: cuda when available)")
    seed: int = 0
    save_every: int = Field(default=100, ge=1, description="optimizer steps between checkpoints (and evaluations)")
    eval_data: FilePath | None = Field(
        default=None, description="held-out pairs (JSONL): MRR@10 per K at the start and at every checkpoint"
    )
    eval_pairs: int = Field(default=256, ge=2, description="held-out pairs evaluated (the file's first ones)")
    resume: bool = Field(default=False, description="continue from output_dir/checkpoint")
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (default: torch's choice)")


def _arg_type(annotation: object) -> tuple[type, dict]:
    """argparse keywords for a field's annotation (the few kinds TrainConfig uses)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _arg_type(args[0])
    if typing.get_origin(annotation) is Literal:
        return str, {"choices": list(args)}
    if typing.get_origin(annotation) is list:
        return args[0], {"nargs": "+"}
    return annotation, {}  # type: ignore[return-value]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if field.is_required():
            parser.add_argument(flag, required=True, type=Path, help=help_text)
        elif field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind, extra = _arg_type(field.annotation)
            default = field.get_default(call_default_factory=True)
            parser.add_argument(flag, type=kind, help=f"{help_text} (default {default})".strip(), **extra)


def command_line(config: TrainConfig) -> str:
    """The `genembed train` command that reproduces `config` (settings left at their default are left out)."""
    parts = ["genembed", "train"]
    for name, field in TrainConfig.model_fields.items():
        value = getattr(config, name)
        if name in RUNTIME_FIELDS or (
            not field.is_required() and value == field.get_default(call_default_factory=True)
        ):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {name: getattr(args, name) for name in TrainConfig.model_fields if getattr(args, name, None) is not None}
    return TrainConfig(**values)
