"""Decode attention on the CPU by a kernel of our own (`cpu_attention.cpp`), compiled on first use.

Why: a decode step's attention is, per running sequence, one new query row against that sequence's cached K and
V. torch's CPU SDPA runs it through its flash kernel, built for long query blocks, whose per-(sequence, head) set-up
costs far more than the arithmetic; on the 2-core machines a fifth to a third of a 16-row SmolLM2 step went there,
several times what reading the KV from memory takes. The kernel reads each kv head's cached K and V once for all the
query heads that share it and also writes the rows' new K and V (the two index writes a layer did before).

It builds with torch's own extension loader (ninja and a C++ compiler, about 7 s once; torch caches the library
under `TORCH_EXTENSIONS_DIR`), for AVX2 with FMA, and only where torch itself runs AVX2 or AVX-512 kernels.
Where it cannot build, the runner keeps SDPA and says so once in the log. It links the OpenMP runtime torch
loaded (same soname), so its threads are torch's intra-op pool, not a second one.
"""

from __future__ import annotations

import functools
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
#: compiler flags per torch CPU capability: ATen's vector types (`at::vec`) at that width, as torch builds its own
ISA = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}

DecodeKernel = Callable[..., torch.Tensor]


@functools.cache
def decode_kernel() -> DecodeKernel | None:
    """`decode_attention(q, k, v, keys, values, positions, scale)` (see the C++ source), or None where it cannot
    run here: a CPU without AVX2, or no compiler or ninja (the reason is logged)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ISA:
        log.info("decode attention runs on SDPA: torch's CPU capability is %s, the kernel needs AVX2", capability)
        return None
    flags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}", *ISA[capability]]
    from torch.utils import cpp_extension  # imports setuptools: only when a CPU runner asks

    try:
        cpp_extension.load(
            name=f"genembed_cpu_attention_{capability.lower()}",  # a cache shared by two CPUs keeps both builds
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        log.warning("decode attention runs on SDPA: building %s failed (%s)", SOURCE.name, error)
        return None
    return torch.ops.genembed.decode_attention
