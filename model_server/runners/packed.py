"""Projections with weights packed once for oneDNN: decode's small row counts on the CPU.

`F.linear` on the CPU hands its weight to the GEMM library in torch's plain layout on every call; at the 1-64
rows a decode step has, re-laying it out costs as much as the product itself. `torch.ops.mkldnn` lets a
weight be reordered once into oneDNN's blocked layout (`_reorder_linear_weight`) and multiplied from there
(`_linear_pointwise`): the path inductor's freezing pass emits, without compiling anything. Measured on the
2-core AMX Xeon at 1 thread (loadtests/bench_decode_step.py; results/decode-step-cpu-1thread.json), 16 rows:
bf16 576→1536 136 → 65 µs, the LM head 576→49,152 5.8 → 3.4 ms, a whole SmolLM2 decode step 1.18-1.30x;
fp32 1.3-1.6x on the projections at 16 rows, but 0.5-0.8x at 1 row (a step: 0.92x at 1 row, 1.05-1.11x at
16-64). `torch.compile` with freezing measured alike within noise on one MLP block (fp32 4.7 ms compiled, 5.7
packed, 7.7 eager; bf16 2.6, 2.8, 8.7; load ~5), but compiles for ~20 s per shape and needs fixed row counts,
which the engine's packed prefills do not have.

On a CPU whose torch runs at AVX2 (no AVX-512), genembed's own GEMM (`cpu_kernels.linear`) takes oneDNN's place:
there oneDNN's packed fp32 GEMM uses a third to two thirds of the cores' arithmetic at decode's row counts and
cannot pack bf16 (`own_gemm`).

Only for serving: a packed projection has no autograd, so a model being trained (ICR) is never packed. The
swap is in place and drops the plain weight (no second copy), except where another module shares it (the LM
head tied to the input embeddings keeps the embedding matrix and adds its packed copy).
"""

from __future__ import annotations

import functools
import logging

import torch

from model_server.loading import LoadedModel
from model_server.runners.cpu_kernels import CpuKernels, cpu_kernels
from model_server.specs import ModelSpec

log = logging.getLogger(__name__)

#: what oneDNN's packed linear computes in (fp64 models, the exactness tests, stay on `F.linear`)
PACKABLE = (torch.float32, torch.bfloat16)


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed projections run here: a CPU build with oneDNN, and fp32 or bf16 weights (`gemm_dtype`)."""
    return device.type == "cpu" and dtype in PACKABLE and torch.backends.mkldnn.is_available()


@functools.cache
def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """What packed GEMMs over `dtype` weights multiply in: `dtype` where oneDNN packs it, else fp32.

    oneDNN packs bf16 only on CPUs with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; an AVX2-only CPU refuses at the
    reorder, and there torch's own bf16 `F.linear` converts on every call: 18 GFLOP/s against 164 for packed fp32
    (2-core AMD EPYC Zen 3, 512 rows; the o1 LM head at 16 rows 78 against 18 ms). An fp32 GEMM over bf16 values,
    its result rounded to bf16, is what a bf16 GEMM computes (exact products, fp32 sums), so the model stays bf16
    everywhere else; the packed weights take twice bf16's memory. Asking oneDNN once is the check that cannot
    drift from its own."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), None)
    except RuntimeError:
        return torch.float32
    return dtype


def own_gemm(spec: ModelSpec) -> CpuKernels | None:
    """genembed's GEMM instead of oneDNN's where torch runs at AVX2 (no AVX-512) and the spec does not keep torch's
    ops (`kernels`); None elsewhere, or where the kernels cannot build. On the 2-core AMD EPYC Zen 3 (AVX2 only),
    against oneDNN's packed GEMM, fp32: 2.0-2.3x at 1 row, 1.3-1.6x at 16, 0.99-1.5x at 32-3328 rows (the LM head
    0.9-1.2x); bf16 weights stay bf16 (oneDNN widens them there). With AVX-512 or AMX, oneDNN's kernels use what
    ours do not (wider tiles, AMX's bf16 tiles), so it stays; ours was not measured against it there."""
    if spec.kernels == "torch" or torch.backends.cpu.get_cpu_capability() != "AVX2":
        return None
    return cpu_kernels()


class PackedLinear(torch.nn.Module):
    """`x @ weight.T + bias` with the weight [out, in] laid out once for a GEMM (inference only): oneDNN's blocked
    layout, or the panels of genembed's own GEMM where `gemm` is given (`own_gemm`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, gemm: CpuKernels | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.gemm = gemm
        # what it takes and returns; what it multiplies in (genembed's GEMM takes bf16 weights as they are)
        self.dtype = weight.dtype
        self.gemm_dtype = self.dtype if gemm is not None else gemm_dtype(self.dtype)
        self.widens = self.gemm_dtype != self.dtype  # checked per call: a `.to` of the same dtype costs 1.4 µs
        if gemm is not None:
            self.packed = gemm.pack_linear(weight.detach())
            bias_dtype = torch.float32  # the GEMM adds it in fp32
        else:  # an opaque oneDNN tensor: an attribute, not a parameter or buffer (no storage to save or move)
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(self.gemm_dtype), None)
            bias_dtype = self.gemm_dtype
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(bias_dtype), requires_grad=False)

    @classmethod
    def of(cls, linear: torch.nn.Linear, gemm: CpuKernels | None = None) -> PackedLinear:
        return cls(linear.weight, linear.bias, gemm)

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        """`activation`: one the GEMM applies to the product while it is in cache ("swish" is SiLU)."""
        if self.gemm is not None:
            return self._own(x, activation, None, "")
        if self.widens:
            x = x.to(self.gemm_dtype)
        out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, activation, [], "")
        return out.to(self.dtype) if self.widens else out

    def _own(self, x: torch.Tensor, activation: str, other: torch.Tensor | None, how: str) -> torch.Tensor:
        """Through genembed's GEMM, which takes rows [m, in]: leading dimensions (a padded batch's) flattened."""
        rows = x.reshape(-1, self.in_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        if other is not None:
            other = other.reshape(-1, self.out_features)
        out = self.gemm.linear(rows, self.packed, self.out_features, self.bias, activation, other, how)
        return out.view(*x.shape[:-1], self.out_features)

    def combined(self, x: torch.Tensor, other: torch.Tensor, how: str) -> torch.Tensor:
        """The product combined with `other` ("add", "mul") in the GEMM's epilogue: no pass of its own."""
        if self.gemm is not None:
            return self._own(x, "none", other, how)
        if self.widens:
            x, other = x.to(self.gemm_dtype), other.to(self.gemm_dtype)
        out = torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, self.bias, how)
        return out.to(self.dtype) if self.widens else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def linear_plus(linear: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`residual + linear(x)`, the sum in the GEMM's epilogue where the weight is packed."""
    return linear.combined(x, residual, "add") if isinstance(linear, PackedLinear) else residual + linear(x)


def gated_product(gate: torch.nn.Module, up: torch.nn.Module, act: torch.nn.Module, silu: bool, x: torch.Tensor):
    """A gated MLP's `act(gate(x)) * up(x)`; where both are packed and `act` is SiLU (`silu`), the activation and
    the product run in the two GEMMs' epilogues (bf16, [3300, 576] → 1536 on the 2-core Xeon: 5.2 against 6.2 ms)."""
    if silu and isinstance(gate, PackedLinear) and isinstance(up, PackedLinear):
        return up.combined(x, gate(x, "swish"), "mul")
    return act(gate(x)).mul_(up(x))


def pack_linears(model: torch.nn.Module, gemm: CpuKernels | None = None) -> int:
    """Swap every `nn.Linear` in `model` (a causal LM: its projections, MLPs and LM head) for a `PackedLinear`
    (for genembed's GEMM where `gemm` is given); returns how many. Idempotent: a second call finds nothing left."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear
    ]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear.of(child, gemm))
    return len(swaps)


def pack_for_serving(loaded: LoadedModel) -> bool:
    """Pack a served model's linear layers as its spec's `linear` says (auto: where oneDNN packs them); whether
    it did. In place: a served model is never trained (the ICR trainer loads its own copy)."""
    choice = loaded.spec.linear
    if choice == "eager":
        return False
    if not packing_available(loaded.device, loaded.dtype):
        if choice == "packed":
            log.warning("packed projections need a CPU with oneDNN and fp32/bf16 weights: eager instead")
        return False
    gemm = own_gemm(loaded.spec)
    if gemm is not None:
        log.info("projections packed for genembed's GEMM (an AVX2 CPU: oneDNN's runs slower here)")
    elif gemm_dtype(loaded.dtype) != loaded.dtype:
        log.info("%s weights packed for fp32 GEMMs: this CPU has no %s GEMM", loaded.dtype, loaded.dtype)
    pack_linears(loaded.model, gemm)
    return True
