"""The fast runner's CPU kernels of our own (`cpu_kernels.cpp`): decode attention, RMSNorm, rotary embedding and
(on CPUs without AVX-512) the projections' GEMM, compiled on first use.

Why: a decode step on the CPU is many small operations on a few rows, and torch's eager ops pay a fixed cost each.
- Decode attention is, per running sequence, one new query row against that sequence's cached K and V. torch's
  CPU SDPA runs it through its flash kernel, built for long query blocks, whose per-(sequence, head) set-up costs
  far more than the arithmetic; on the 2-core machines a fifth to a third of a 16-row SmolLM2 step went there. The
  kernel reads each kv head's cached K and V once for all the query heads that share it, fetches the next task's
  ahead, and also writes the rows' new K and V (two index writes a layer before). New prompts attend the same way,
  over their K and V where the fused projection left them: through SDPA, a pooled SmolLM2 prefill (64 prompts of
  ~51 tokens, fp32, 2-core AVX2 EPYC) spent 6.8 % of its time in SDPA and ~4 % gathering prompts into padded
  batches and repeating K and V per query head; the kernel took 2.4 %.
- RMSNorm through torch is about ten ops (widen, square, mean, add, rsqrt, multiply, narrow, times the weight); in
  a decode step they took 12 % of it on the AMX Xeon. The kernel does a row in one pass. It rounds where the
  family's module rounds; only its sum of squares adds in another order than torch's, so a result may differ from
  the module's in the last bit (fp32), rarely by one bf16 step.
- Rotary embedding as three eager passes (multiply, two in-place multiply-adds) over q and k took ~8 % of a
  pooled prefill; the kernel reads q or k from the fused projection's output once and rounds as the family's
  `x * cos + rotate_half(x) * sin` does.
- The GEMM (`linear` over a weight laid out once by `pack_linear`): on an AVX2-only CPU, oneDNN's packed fp32
  GEMM ran decode's row counts at a third to two thirds of the arithmetic the cores have (16 rows, 2-core AMD EPYC
  Zen 3: 84 GFLOP/s of ~150), and it cannot pack bf16 there at all (it widens to fp32 weights). A plain
  register-tiled kernel (6 rows × 16 outputs a tile) over panels stored k-major ran 2-2.7x oneDNN at 1 row (weights
  in cache), 1.2-1.6x at 16, 0.94-1.15x at prefill's hundreds to thousands, and keeps bf16 weights
  bf16. Where oneDNN has AVX-512 or AMX it stays (`packed.own_gemm`).

They build with torch's own extension loader (ninja and a C++ compiler, about 7 s once; torch keeps the library
under `TORCH_EXTENSIONS_DIR`) over ATen's vector types at the width torch itself runs here (AVX2 or AVX-512),
and only there. Where they cannot build, the runner keeps torch's ops and says why once in the log. They link
the OpenMP runtime torch loaded (the same soname), so their threads are torch's intra-op pool, not a second one.
"""

from __future__ import annotations

import functools
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
#: compiler flags per torch CPU capability: ATen's vector types (`at::vec`) at that width, as torch builds its own
ISA = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


#: the decode kernel's bounds (`kMaxHeadDim`, `kMaxHeads` in the C++): larger heads attend through SDPA
MAX_HEAD_DIM, MAX_GROUP = 256, 64


@dataclass(frozen=True)
class CpuKernels:
    #: (q [n, n_kv, g, d], k, v [n, n_kv, d], keys, values [slots, n_kv, cap, d], positions [n], scale) -> [n, n_kv,
    #: g, d]; writes k and v into the pool at `positions` first
    decode_attention: Callable[..., torch.Tensor]
    #: (q [rows, n_kv, g, d], k, v [rows, n_kv, d], starts [prompts + 1] int64 on the host, scale) -> [rows, n_kv, g,
    #: d]: prompts packed end to end attend causally to themselves; rows past the last prompt are zeros
    prefill_attention: Callable[..., torch.Tensor]
    #: (x [..., h], weight [h], eps) -> the family's RMSNorm of x
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    #: (x [tokens, heads, d], cos, sin [tokens, d]) -> x with rotary embedding, contiguous
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    #: (weight [out, in], fp32 or bf16) -> the layout `linear` reads
    pack_linear: Callable[[torch.Tensor], torch.Tensor]
    #: (x [m, in], packed, out, bias [out] fp32 | None, "none" | "swish", other [m, out] | None, "" | "add" | "mul")
    #: -> [m, out]: x @ weight.T + bias, the activation, then combined with `other`, rounded once to x's dtype
    linear: Callable[..., torch.Tensor]


@functools.cache
def cpu_kernels() -> CpuKernels | None:
    """The compiled ops, or None where they cannot run here: a CPU without AVX2, or no compiler or ninja (the
    reason is logged)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ISA:
        log.info("the runner keeps torch's ops: torch's CPU capability is %s, genembed's kernels need AVX2", capability)
        return None
    from torch.utils import cpp_extension  # imports setuptools: only when a CPU runner asks

    # -ffp-contract=off: no `a * b + c` in one rounding where the kernels round as the family's modules round
    flags = ["-O3", "-ffp-contract=off", "-fopenmp", f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    try:
        cpp_extension.load(
            name=f"genembed_cpu_kernels_{capability.lower()}",  # a cache shared by two CPUs keeps both builds
            sources=[str(SOURCE)],
            extra_cflags=flags + ISA[capability],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        log.warning("the runner keeps torch's ops: building %s failed (%s)", SOURCE.name, error)
        return None
    ops = torch.ops.genembed
    return CpuKernels(
        decode_attention=ops.decode_attention,
        prefill_attention=ops.prefill_attention,
        rms_norm=ops.rms_norm,
        rope=ops.rope,
        pack_linear=ops.pack_linear,
        linear=ops.linear,
    )
