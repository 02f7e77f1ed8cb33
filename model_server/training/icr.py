"""Iterative Contrastive Refinement (ICR): the GIRCSE training objective, and its training loop.

For a batch of (query, document) pairs both sides run K soft-token steps (the serving
computation, made differentiable). For every prefix i = 1..K the embedding is the mean of the first
i step states, and an InfoNCE loss (in-batch negatives plus optional hard negatives) scores it; the
loss is the mean over i plus `reg_weight` · mean(ReLU(log L_{i+1} − log L_i)), which penalises a
step that makes the embedding worse. Prompts are built by the serving PromptBuilder and the next
input by the serving `soft_tokens`, so train and serve cannot drift.

The forward is the Hugging Face decoder's own (inputs_embeds, left padding, position ids from the
mask) with a KV cache across steps; with gradient checkpointing, which cannot keep a cache, every
step re-runs the whole sequence instead (K+1 times the compute, a fraction of the memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache

from common.methods import which
from common.protocol import EmbedItem
from evaluation.lee import mrr10, ranks_of_the_right_document
from model_server.hf_compat import cache_kwarg, enable_activation_checkpointing
from model_server.loading import load_model
from model_server.methods.gircse import soft_tokens
from model_server.prompts import PromptBuilder
from model_server.runners.fast import group_by_length
from model_server.specs import ModelSpec, load_spec
from model_server.training.config import RUNTIME_FIELDS, TrainConfig, command_line
from model_server.training.data import read_jsonl

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoint"
LOSS_LOG = "losses.jsonl"
EVAL_LOG = "eval.jsonl"


# ---------------------------------------------------------------------------------------------
# The objective


@dataclass
class IcrLoss:
    total: torch.Tensor
    prefix: torch.Tensor  # [K]: InfoNCE of the mean of the first i step states, i = 1..K
    regulariser: torch.Tensor


def refinement_regulariser(prefix_losses: torch.Tensor) -> torch.Tensor:
    """mean(ReLU(log L_{i+1} − log L_i)): zero when every step lowers the loss."""
    if len(prefix_losses) < 2:
        return prefix_losses.new_zeros(())
    logs = torch.log(prefix_losses + 1e-8)
    return F.relu(logs[1:] - logs[:-1]).mean()


def prefix_embeddings(states: torch.Tensor) -> torch.Tensor:
    """[B, K, H] step states -> [B, K, H] embeddings: row i is the L2-normalised mean of the first
    i + 1 states, what the engine serves for K = i + 1. In fp32 whatever the states are."""
    counts = torch.arange(1, states.shape[1] + 1, device=states.device, dtype=torch.float32)[:, None]
    return F.normalize(states.float().cumsum(dim=1) / counts, dim=-1)


def icr_loss(queries: torch.Tensor, documents: torch.Tensor, temperature: float, reg_weight: float) -> IcrLoss:
    """`queries` [B, K, H] and `documents` [D, K, H] step states, D ≥ B: document i is query i's
    positive, every other document a negative for it."""
    batch, steps = queries.shape[:2]
    scores = torch.einsum("bkh,dkh->kbd", prefix_embeddings(queries), prefix_embeddings(documents)) / temperature
    targets = torch.arange(batch, device=queries.device).repeat(steps)
    prefix = F.cross_entropy(scores.flatten(0, 1), targets, reduction="none").view(steps, batch).mean(dim=1)
    regulariser = refinement_regulariser(prefix)
    return IcrLoss(prefix.mean() + reg_weight * regulariser, prefix, regulariser)


# ---------------------------------------------------------------------------------------------
# The differentiable gircse computation


def rollout(
    causal_lm: torch.nn.Module, prompts: list[list[int]], steps: int, temperature: float, use_cache: bool = True
) -> torch.Tensor:
    """Final-layer states of K soft-token steps for each prompt: [B, K, H] (the prefill state is
    not among them). Prompts are left-padded so every row's last position is its own last token;
    positions count real tokens only, as the serving runner's do."""
    embeddings = causal_lm.get_input_embeddings()
    device = embeddings.weight.device
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, width - len(prompt) :] = 1
    inputs = embeddings(ids)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    decoder = causal_lm.get_decoder()
    cache = cache_kwarg(decoder, DynamicCache(config=decoder.config) if use_cache else None)
    out = decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=use_cache, **cache)
    states = []
    for step in range(steps):
        last = out.last_hidden_state[:, -1]
        if step:
            states.append(last)
        # The LM head and the soft token in the weights' own precision, outside any autocast: as
        # served, and without a bf16 copy of the vocabulary matrix kept per step for backward.
        with torch.autocast(device.type, enabled=False):
            soft = soft_tokens(causal_lm, last.to(embeddings.weight.dtype), temperature)[:, None]
        mask = F.pad(mask, (0, 1), value=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if use_cache:
            out = decoder(
                inputs_embeds=soft,
                attention_mask=mask,
                position_ids=positions[:, -1:],
                use_cache=True,
                **cache,
            )
        else:
            inputs = torch.cat([inputs, soft], dim=1)
            out = decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=False)
    states.append(out.last_hidden_state[:, -1])
    return torch.stack(states, dim=1)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class Batch:
    queries: list[list[int]]
    documents: list[list[int]]  # positives (one per query, in order), then distinct hard negatives

    @property
    def tokens(self) -> int:
        return sum(map(len, self.queries)) + sum(map(len, self.documents))


class TrainingPrompts:
    """Token ids exactly as the engine builds them (the serving PromptBuilder: template,
    instruction, truncation of the body), under training's own length limits."""

    def __init__(self, spec: ModelSpec, tokenizer, vocab_size: int, config: TrainConfig) -> None:
        limits = {"query": config.query_max_tokens, "document": config.document_max_tokens}
        self.builders = {
            kind: PromptBuilder(spec.model_copy(update={"max_input_tokens": limit}), tokenizer, vocab_size)
            for kind, limit in limits.items()
        }
        self.steps = config.refinement_steps

    def ids(self, text: str, input_type: str) -> list[int]:
        item = EmbedItem(text=text, input_type=input_type, steps=self.steps, truncate=True)  # type: ignore[arg-type]
        return self.builders[input_type].prepare(item).token_ids


class PairBatches:
    """Seeded micro-batches over the pairs: epoch e visits them in permutation(seed + e), a batch is
    `batch_size` consecutive pairs (an epoch's remainder is skipped), so micro-batch m is the same
    whenever it is asked for, and a resumed run sees exactly the batches it would have seen."""

    def __init__(self, rows: list[dict], config: TrainConfig, prompts: TrainingPrompts) -> None:
        if len(rows) < config.batch_size:
            raise ValueError(f"{len(rows)} training pairs, fewer than one batch of {config.batch_size}")
        self.rows = rows
        self.config = config
        self.prompts = prompts
        self.per_epoch = len(rows) // config.batch_size

    def __getitem__(self, index: int) -> Batch:
        epoch, offset = divmod(index, self.per_epoch)
        order = np.random.default_rng(self.config.seed + epoch).permutation(len(self.rows))
        size = self.config.batch_size
        rows = [self.rows[i] for i in order[offset * size : (offset + 1) * size]]
        documents = [row["document"] for row in rows]
        for row in rows:
            for negative in row.get("negatives", [])[: self.config.hard_negatives]:
                if negative not in documents:  # a pair's positive is never also a negative column
                    documents.append(negative)
        return Batch(
            queries=[self.prompts.ids(row["query"], "query") for row in rows],
            documents=[self.prompts.ids(text, "document") for text in documents],
        )


def _autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA only. On CPU (avx512_bf16 included) bf16 autocast measured slower than
    fp32 for this training (frozen weights are re-cast at every call) and held ~50% more memory."""
    if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _lr_factor(config: TrainConfig, step: int) -> float:
    """Linear warm-up to the peak, then linear decay to zero at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return max(0.0, (config.steps - step) / max(1, config.steps - config.warmup_steps))


def _check_resumable(config: TrainConfig, run_dir: Path) -> None:
    saved = TrainConfig.model_validate_json((run_dir / "config.json").read_text())
    differ = [
        name
        for name in TrainConfig.model_fields
        if name not in RUNTIME_FIELDS and getattr(saved, name) != getattr(config, name)
    ]
    if differ:
        raise ValueError(f"cannot resume {run_dir}: these settings differ from the saved run's: {', '.join(differ)}")


class IcrTrainer:
    def __init__(self, config: TrainConfig) -> None:
        from peft import LoraConfig, get_peft_model

        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        spec = load_spec(config.model)
        if not spec.facts.soft_tokens:
            trains = which(lambda m: m.soft_tokens)
            raise ValueError(f"ICR trains {trains} models; {config.model!r} is a {spec.method} model")
        if spec.adapter:
            log.info("spec %s names an adapter; training a fresh one on its backbone", spec.id)
        self.loaded = load_model(spec.model_copy(update={"adapter": None, "dtype": "float32", "device": config.device}))
        self.spec = self.loaded.spec
        torch.manual_seed(config.seed)  # the LoRA initialisation
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(self.loaded.model, lora)
        # The adapter names the spec's backbone, not this machine's converted copy of it.
        self.model.peft_config["default"].base_model_name_or_path = spec.backbone
        self.lm = self.model.get_base_model()  # the causal LM with the LoRA layers in place
        if config.gradient_checkpointing:
            enable_activation_checkpointing(self.lm)
        self.device = self.loaded.device
        self.autocast = _autocast_dtype(config, self.device)
        self.prompts = TrainingPrompts(self.spec, self.loaded.tokenizer, self.loaded.vocab_size, config)
        self.batches = PairBatches(read_jsonl(config.data), config, self.prompts)
        self.eval_set: tuple[list[list[int]], list[list[int]]] | None = None
        if config.eval_data:
            rows = read_jsonl(config.eval_data)[: config.eval_pairs]
            self.eval_set = (
                [self.prompts.ids(r["query"], "query") for r in rows],
                [self.prompts.ids(r["document"], "document") for r in rows],
            )
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _lr_factor(config, s))
        self.step = 0

    # -- forward -----------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def states(self, prompts: list[list[int]]) -> torch.Tensor:
        """[B, K, H] step states. Prompts run in groups of similar length (the serving runner's
        grouping), so left padding costs little compute. Only training under checkpointing re-runs
        whole sequences; evaluation keeps the KV cache."""
        use_cache = not (self.config.gradient_checkpointing and self.model.training)
        rows: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
        for group in group_by_length([len(p) for p in prompts]):
            with self._autocast():
                states = rollout(
                    self.lm,
                    [prompts[i] for i in group],
                    self.config.refinement_steps,
                    self.spec.soft_token_temperature,
                    use_cache=use_cache,
                )
            for index, row in zip(group, states, strict=True):
                rows[index] = row
        return torch.stack(rows)

    def loss(self, batch: Batch) -> IcrLoss:
        config = self.config
        return icr_loss(
            self.states(batch.queries), self.states(batch.documents), config.contrastive_temperature, config.reg_weight
        )

    @torch.no_grad()
    def evaluate(self) -> dict:
        """MRR@10 of the held-out pairs, each query against all their documents, for every K = 1..K
        at once (the prefixes of one rollout), in eval mode: what the engine would serve."""
        assert self.eval_set is not None
        self.model.eval()
        chunk = 4 * self.config.batch_size
        q, d = (
            prefix_embeddings(torch.cat([self.states(p[i : i + chunk]) for i in range(0, len(p), chunk)]))
            for p in self.eval_set
        )
        q, d = (x.float().cpu().numpy() for x in (q, d))  # (pairs, K, hidden)
        mrr = [mrr10(ranks_of_the_right_document(q[:, k], d[:, k])) for k in range(q.shape[1])]
        return {"step": self.step, "pairs": len(q), "mrr10_by_k": [round(m, 4) for m in mrr]}

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self.config.output_dir

    def save_checkpoint(self) -> None:
        """Adapter plus optimizer, schedule and RNG state, written beside and then swapped in."""
        final = self.run_dir / CHECKPOINT_DIR
        tmp = final.with_name(CHECKPOINT_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp / ADAPTER_DIR)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        torch.save(state, tmp / "state.pt")
        old = final.with_name(CHECKPOINT_DIR + ".old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = self.run_dir / CHECKPOINT_DIR
        weights = load_file(str(folder / ADAPTER_DIR / "adapter_model.safetensors"), device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        if any("lora" in key for key in result.unexpected_keys):
            raise ValueError(f"checkpoint {folder} does not fit this LoRA configuration")
        state = torch.load(folder / "state.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.step = state["step"]

    def _prepare_run_dir(self) -> None:
        """A fresh run needs an empty place; a resumed one the same settings, and its log cut back
        to the checkpoint so that steps redone after it are not logged twice."""
        run_dir, config = self.run_dir, self.config
        has_checkpoint = (run_dir / CHECKPOINT_DIR / "state.pt").is_file()
        if config.resume:
            if not has_checkpoint:
                raise ValueError(f"--resume: {run_dir / CHECKPOINT_DIR} holds no checkpoint")
            _check_resumable(config, run_dir)
            self.load_checkpoint()
            for log_path in (run_dir / LOSS_LOG, run_dir / EVAL_LOG):
                rows = read_jsonl(log_path) if log_path.is_file() else []
                with log_path.open("w") as handle:
                    handle.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= self.step)
            return
        if has_checkpoint or (run_dir / ADAPTER_DIR).exists():
            raise ValueError(f"{run_dir} already holds a run: pass --resume to continue it, or pick a new directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (LOSS_LOG, EVAL_LOG):  # from an attempt that died before its first checkpoint
            (run_dir / stale).unlink(missing_ok=True)
        (run_dir / "config.json").write_text(config.model_dump_json(indent=2) + "\n")

    # -- the loop ----------------------------------------------------------------------------

    def micro_batches(self) -> Iterator[Batch]:
        accum = self.config.grad_accum
        for index in range(self.step * accum, (self.step + 1) * accum):
            yield self.batches[index]

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns its log row."""
        config = self.config
        started = time.perf_counter()
        self.model.train()
        prefix = torch.zeros(config.refinement_steps)
        totals = {"loss": 0.0, "regulariser": 0.0}
        tokens = pairs = 0
        for batch in self.micro_batches():
            loss = self.loss(batch)
            (loss.total / config.grad_accum).backward()
            prefix += loss.prefix.detach().cpu() / config.grad_accum
            totals["loss"] += loss.total.item() / config.grad_accum
            totals["regulariser"] += loss.regulariser.item() / config.grad_accum
            tokens += batch.tokens
            pairs += len(batch.queries)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - started
        return {
            "step": self.step,
            **totals,
            "prefix_losses": [round(float(v), 6) for v in prefix],
            "lr": lr,
            "grad_norm": float(grad_norm),
            "pairs_per_s": pairs / seconds,
            "tokens_per_s": tokens / seconds,
            "seconds": seconds,
        }

    def save_adapter(self) -> Path:
        target = self.run_dir / ADAPTER_DIR
        self.model.save_pretrained(target)
        (target / "README.md").write_text(self.model_card())  # replaces peft's empty template
        return target

    def model_card(self) -> str:
        """What produced the adapter: data, settings, the command, the last losses and evaluation.
        Markdown, which the revision digest ignores: the card can be edited without changing vectors."""
        config = self.config
        with config.data.open("rb") as handle:
            data_digest = hashlib.file_digest(handle, "sha256").hexdigest()
        recent = read_jsonl(self.run_dir / LOSS_LOG)[-20:]
        evals = read_jsonl(self.run_dir / EVAL_LOG) if (self.run_dir / EVAL_LOG).is_file() else []
        settings = "\n".join(f"| {k} | {v} |" for k, v in json.loads(config.model_dump_json()).items())
        lines = [
            f"# gircse ICR adapter for `{self.spec.id}`",
            "",
            f"LoRA adapter trained with Iterative Contrastive Refinement (GIRCSE) for backbone `{self.spec.backbone}` "
            f'(base revision `{self.loaded.revision}`). Load it with `adapter = "<this directory>"` in a spec.',
            "",
            f"- data: `{config.data}` ({len(self.batches.rows)} pairs, sha256 `{data_digest}`)",
            f"- optimizer steps: {self.step} × {config.batch_size * config.grad_accum} pairs, seed {config.seed}",
            f"- reproduce: `{command_line(config)}`",
        ]
        if recent:
            mean = np.mean([r["prefix_losses"] for r in recent], axis=0)
            lines.append(
                f"- mean prefix losses (K = 1..{config.refinement_steps}) of the last {len(recent)} steps: "
                + ", ".join(f"{v:.3f}" for v in mean)
            )
        if evals:
            lines.append(
                f"- held-out MRR@10 by K at step {evals[-1]['step']} ({evals[-1]['pairs']} pairs, "
                f"from step 0: {evals[0]['mrr10_by_k']}): {evals[-1]['mrr10_by_k']}"
            )
        lines += ["", "| setting | value |", "|---|---|", settings, ""]
        return "\n".join(lines)

    def _log_eval(self) -> None:
        if self.eval_set is None:
            return
        row = self.evaluate()
        with (self.run_dir / EVAL_LOG).open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        tqdm.write(f"step {row['step']}: held-out MRR@10 by K {row['mrr10_by_k']} ({row['pairs']} pairs)")

    def run(self) -> Path:
        config = self.config
        self._prepare_run_dir()
        if self.step == 0:
            self._log_eval()
        bar = tqdm(total=config.steps, initial=self.step, desc="icr", unit="step", dynamic_ncols=True)
        with (self.run_dir / LOSS_LOG).open("a") as log_file:
            while self.step < config.steps:
                row = self.train_step()
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"loss is {row['loss']} at step {self.step}")
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                prefix = row["prefix_losses"]
                bar.set_postfix(
                    loss=f"{row['loss']:.3f}",
                    L1=f"{prefix[0]:.3f}",
                    LK=f"{prefix[-1]:.3f}",
                    pairs_s=f"{row['pairs_per_s']:.1f}",
                    tok_s=f"{row['tokens_per_s']:.0f}",
                )
                bar.update(1)
                if self.step % config.save_every == 0 or self.step == config.steps:
                    self.save_checkpoint()
                    self._log_eval()
        bar.close()
        return self.save_adapter()


def train(config: TrainConfig) -> Path:
    """Run (or resume) a training run; returns the adapter directory a spec names as `adapter`."""
    return IcrTrainer(config).run()
