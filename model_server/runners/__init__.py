"""Model runners: batched forward passes of a causal decoder over KV slots, behind one interface (`base.Runner`).

`fast.DecoderRunner` (llama, mistral, qwen2, qwen3: packed prefills over a slot KV pool, CUDA-graph decode steps)
and `hf.HFRunner` (any other family: the model's own forward, a cache per sequence); `packed` packs linear layers
for oneDNN on the CPU. `build_runner` picks one for a loaded model.
"""

from __future__ import annotations

import logging

from model_server.loading import LoadedModel
from model_server.runners.base import Prefill, Runner, lm_logits
from model_server.runners.fast import FAMILIES, DecoderRunner
from model_server.runners.hf import HFRunner
from model_server.runners.packed import pack_for_serving

__all__ = ["Prefill", "Runner", "build_runner", "lm_logits"]

log = logging.getLogger(__name__)


def build_runner(loaded: LoadedModel, max_seqs: int) -> Runner:
    """The fast runner where it implements the model's family (its linear layers packed as the spec says), else
    the HF fallback."""
    spec, family = loaded.spec, loaded.model.config.model_type
    if family not in FAMILIES:
        runner: Runner = HFRunner(loaded.model)
        how = "the model's own forward"
    else:
        packed = pack_for_serving(loaded)
        graphs = spec.cuda_graphs and loaded.device.type == "cuda"
        eager = spec.attn_implementation == "eager"
        runner = DecoderRunner(loaded.model, max_seqs, eager_attention=eager, cuda_graphs=graphs)
        runner.packed = packed
        how = f"{'packed' if packed else 'eager'} projections{', CUDA-graph decode steps' if graphs else ''}"
    log.info("%s (%s): %s runs on the %s runner (%s)", spec.id, family, spec.method, runner.kind, how)
    return runner
