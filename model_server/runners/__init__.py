"""Model runners: batched forward passes of a causal decoder over KV slots, behind one interface (`base.Runner`).

`fast.DecoderRunner` (llama, mistral, qwen2, qwen3: packed prefills over a slot KV pool, CUDA-graph decode steps)
and `hf.HFRunner` (any other family: the model's own forward, a cache per sequence); `packed` packs linear layers
for a CPU GEMM (oneDNN's, or genembed's own on AVX2-only CPUs), `cpu_kernels` compiles decode and prefill
attention, RMSNorm, rotary and that GEMM. `build_runner` picks
one for a loaded model.
"""

from __future__ import annotations

import logging

from model_server.loading import LoadedModel
from model_server.runners.base import Prefill, Runner, lm_logits
from model_server.runners.fast import FAMILIES, DecoderRunner
from model_server.runners.hf import HFRunner
from model_server.runners.packed import own_gemm, pack_for_serving

__all__ = ["DecoderRunner", "Prefill", "Runner", "build_runner", "fast_runner", "lm_logits"]

log = logging.getLogger(__name__)


def build_runner(loaded: LoadedModel, max_seqs: int) -> Runner:
    """The fast runner where it implements the model's family, else the HF fallback."""
    runner = fast_runner(loaded, max_seqs)
    if runner is None:
        spec, family = loaded.spec, loaded.model.config.model_type
        log.info("%s (%s): %s runs on the hf runner (the model's own forward)", spec.id, family, spec.method)
        return HFRunner(loaded.model)
    return runner


def fast_runner(loaded: LoadedModel, max_seqs: int) -> DecoderRunner | None:
    """The fast runner, its linear layers packed as the spec says, where it implements the model's family (a
    causal LM, or the base decoder a pooled method reads); None elsewhere."""
    spec, family = loaded.spec, loaded.model.config.model_type
    if family not in FAMILIES:
        return None
    graphs = spec.cuda_graphs and loaded.device.type == "cuda"
    compiled = spec.kernels == "auto"  # the runner uses them on the CPU only
    runner = DecoderRunner(
        loaded.model, max_seqs, attention=spec.attn_implementation, cuda_graphs=graphs, cpu_kernels=compiled
    )
    runner.packed = pack_for_serving(loaded)  # after the runner fused its projections: one packed weight each
    runner.pads_rows = not (runner.packed and own_gemm(spec) is not None)
    how = f"{'packed' if runner.packed else 'eager'} projections{', CUDA-graph decode steps' if graphs else ''}"
    how += ", genembed's CPU kernels" if runner.kernels is not None else ""
    log.info("%s (%s): %s runs on the %s runner (%s)", spec.id, family, spec.method, runner.kind, how)
    return runner
