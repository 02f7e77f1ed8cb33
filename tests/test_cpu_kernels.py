"""genembed's CPU kernels (`model_server/runners/cpu_kernels.cpp`), compiled here as the worker compiles them: decode
attention against SDPA over the same pool, RMSNorm against the family's module, both inside the runner's passes,
the GEMM against an fp64 product, and the fallback where they cannot build. (The fidelity tests run on them too:
the specs' default `kernels = auto` uses them on the CPU.)"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from model_server.runners import cpu_kernels
from model_server.runners.base import Prefill
from model_server.runners.fast import DecoderRunner
from tests.models import make_tiny_llama

# (dtype, how far from an fp64 reference the kernel may be, relative to the largest output)
TOLERANCES = [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)]


@pytest.fixture(scope="module")
def kernels():
    built = cpu_kernels.cpu_kernels()
    assert built is not None, "the kernels must build on the CI machines (AVX2, gcc, ninja)"
    return built


@pytest.fixture(scope="module")
def kernel(kernels):
    return kernels.decode_attention


def _pool(n, n_kv, cap, d, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(n + 2, n_kv, cap, d, generator=generator).to(dtype)  # two free slots after the rows
    return keys, torch.randn(keys.shape, generator=generator).to(dtype)


@pytest.mark.parametrize(("dtype", "tolerance"), TOLERANCES)
@pytest.mark.parametrize(("n_kv", "group", "d"), [(2, 2, 16), (3, 3, 64), (1, 1, 128), (4, 1, 32)])
def test_kernel_attends_and_writes_as_sdpa_does(kernel, dtype, tolerance, n_kv, group, d):
    n, cap = 5, 40
    keys, values = _pool(n, n_kv, cap, d, dtype)
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(n, n_kv, group, d, generator=generator).to(dtype)
    # the new K and V as the runner has them: a row's heads contiguous, rows strided (a slice of the fused qkv)
    kv = torch.randn(n, 3 * n_kv * d, generator=generator).to(dtype)
    k, v = kv[:, : n_kv * d].view(n, n_kv, d), kv[:, 2 * n_kv * d :].view(n, n_kv, d)
    positions = torch.tensor([0, 7, 39, 12, 1])
    want_keys, want_values = keys.clone(), values.clone()
    rows = torch.arange(n)
    want_keys[rows, :, positions], want_values[rows, :, positions] = k, v
    span = int(positions.max()) + 1
    visible = (torch.arange(span)[None, :] <= positions[:, None])[:, None, None, :]
    want = F.scaled_dot_product_attention(
        q.double(), want_keys[:n, :, :span].double(), want_values[:n, :, :span].double(), attn_mask=visible
    )
    sdpa = F.scaled_dot_product_attention(q, want_keys[:n, :, :span], want_values[:n, :, :span], attn_mask=visible)

    got = kernel(q, k, v, keys, values, positions, d**-0.5)

    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)  # the new rows, nothing else
    assert got.dtype == dtype and got.shape == q.shape
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= tolerance * scale
    # no further from the exact result than SDPA itself, beyond one rounding of the output
    sdpa_error = (sdpa.double() - want).abs().max().item()
    assert (got.double() - want).abs().max().item() <= sdpa_error + tolerance * scale


@pytest.mark.parametrize(("dtype", "tolerance"), TOLERANCES)
@pytest.mark.parametrize(("n_kv", "group", "d"), [(2, 2, 16), (3, 3, 64), (1, 1, 128)])
def test_prompts_attend_to_themselves_as_sdpa_does(kernels, dtype, tolerance, n_kv, group, d):
    lengths, padding = [5, 1, 13, 8, 150], 3  # 150: three blocks of rows, each seeing the keys before it
    rows = sum(lengths) + padding
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(rows, n_kv, group, d, generator=generator).to(dtype)
    # K and V as the runner has them: a row's heads contiguous; K rotated (its own rows), V a slice of the fused qkv
    k = torch.randn(rows, n_kv, d, generator=generator).to(dtype)
    v = torch.randn(rows, 3 * n_kv * d, generator=generator).to(dtype)[:, 2 * n_kv * d :].view(rows, n_kv, d)
    starts = torch.tensor([0, *itertools.accumulate(lengths)])

    got = kernels.prefill_attention(q, k, v, starts, d**-0.5)

    assert got.dtype == dtype and got.shape == q.shape
    assert torch.equal(got[sum(lengths) :], torch.zeros_like(got[sum(lengths) :]))  # padding rows
    for first, last in itertools.pairwise(starts.tolist()):
        # [kv, n, d] per prompt; each kv head's query heads as a batch of their own
        qp, kp, vp = q[first:last].permute(1, 2, 0, 3), k[first:last].transpose(0, 1), v[first:last].transpose(0, 1)
        want = F.scaled_dot_product_attention(qp.double(), kp[:, None].double(), vp[:, None].double(), is_causal=True)
        sdpa = F.scaled_dot_product_attention(qp, kp[:, None], vp[:, None], is_causal=True)
        mine = got[first:last].permute(1, 2, 0, 3).double()
        scale = want.abs().max().item()
        assert (mine - want).abs().max().item() <= tolerance * scale
        assert (mine - want).abs().max().item() <= (sdpa.double() - want).abs().max().item() + tolerance * scale


def test_prefill_attention_refuses_what_does_not_fit(kernels):
    q, k = torch.randn(6, 2, 2, 16), torch.randn(6, 2, 16)
    with pytest.raises(RuntimeError, match="from 0 to at most the rows"):
        kernels.prefill_attention(q, k, k, torch.tensor([0, 4, 7]), 0.25)
    with pytest.raises(RuntimeError, match="an empty prompt"):
        kernels.prefill_attention(q, k, k, torch.tensor([0, 4, 4]), 0.25)
    with pytest.raises(RuntimeError, match="int64"):
        kernels.prefill_attention(q, k, k, torch.tensor([0, 4], dtype=torch.int32), 0.25)
    with pytest.raises(RuntimeError, match="one dtype"):
        kernels.prefill_attention(q, k.double(), k, torch.tensor([0, 4]), 0.25)
    with pytest.raises(RuntimeError, match=r"\[rows, n_kv, d\]"):
        kernels.prefill_attention(q, k[:5], k[:5], torch.tensor([0, 4]), 0.25)


def test_heads_beyond_the_kernels_bounds_attend_through_sdpa(tmp_path, kernels):
    model = AutoModelForCausalLM.from_pretrained(
        make_tiny_llama(tmp_path / "wide", hidden_size=1024, num_attention_heads=2, num_key_value_heads=1)
    ).eval()
    runner = DecoderRunner(model, 4, cpu_kernels=True)
    assert runner.head_dim == 512 and runner.kernels is not None and runner._decode_kernel is None
    runner.forward(None, [Prefill(0, torch.randn(3, 1024), 8)])
    assert runner.forward(torch.randn(1, 1024), [])[0].shape == (1, 1024)
    keys, values = _pool(1, 1, 4, 512, torch.float32)
    with pytest.raises(RuntimeError, match="head_dim <= 256"):
        kernels.decode_attention(
            torch.randn(1, 1, 2, 512),
            torch.randn(1, 1, 512),
            torch.randn(1, 1, 512),
            keys,
            values,
            torch.tensor([1]),
            1.0,
        )


def test_kernel_refuses_what_does_not_fit(kernel):
    keys, values = _pool(2, 2, 8, 16, torch.float32)
    q, k = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 16)
    with pytest.raises(RuntimeError, match="outside the pool's capacity"):
        kernel(q, k, k, keys, values, torch.tensor([3, 8]), 0.25)
    with pytest.raises(RuntimeError, match="one dtype"):
        kernel(q, k.double(), k, keys, values, torch.tensor([3, 4]), 0.25)
    with pytest.raises(RuntimeError, match="int64 positions"):
        kernel(q, k, k, keys, values, torch.tensor([3, 4], dtype=torch.int32), 0.25)
    with pytest.raises(RuntimeError, match="does not fit q"):
        kernel(torch.randn(2, 2, 2, 8), k, k, keys, values, torch.tensor([3, 4]), 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runner_passes_alike_on_the_kernels_and_on_torch(tmp_path, kernels, dtype):
    """Prompts of different lengths encode, prefill, then decode steps while a sequence joins and one leaves, on
    both paths: the same states."""
    directory = make_tiny_llama(tmp_path / "tiny")
    runners = {
        on: DecoderRunner(AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval(), 8, cpu_kernels=on)
        for on in (True, False)
    }
    assert runners[True]._decode_kernel is not None and runners[True]._prefill_kernel is not None
    assert runners[False].kernels is None
    generator = torch.Generator().manual_seed(0)

    def rows(n):
        return torch.randn(n, 32, generator=generator).to(dtype)

    first = [Prefill(i, rows(n), 32) for i, n in enumerate((5, 11, 3))]
    # (decode rows, a joining prompt) per pass, or a sequence leaving
    plan = [(rows(3), []), (rows(3), [Prefill(3, rows(7), 32)]), (rows(4), []), 1, (rows(3), []), (rows(3), [])]
    outputs = {on: [] for on in runners}
    encoded = [rows(n) for n in (9, 2, 6)]
    for on, runner in runners.items():
        outputs[on] += runner.encode(encoded)  # prompts that keep no KV, in a pass of their own
        outputs[on] += runner.forward(None, first)[1]
        for step in plan:
            if isinstance(step, int):
                runner.remove([step])
                continue
            decoded, prefilled = runner.forward(*step)
            outputs[on] += [decoded, *prefilled]
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for got, want in zip(outputs[True], outputs[False], strict=True):
        assert (got.float() - want.float()).abs().max() <= tolerance * want.float().abs().max()


@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("width", [32, 576, 100])
def test_rms_norm_rounds_where_the_family_rounds(kernels, rows, width):
    """Against the family's own module: fp32 within a few ulp (only the sum of squares adds in another order; the
    runner's old torch path was bit-exact here), bf16 within two bf16 steps (the normed value's and the product's
    rounding) and the same in nearly every element; fp64 as torch computes it in fp64."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    generator = torch.Generator().manual_seed(rows * width)
    norm = LlamaRMSNorm(width, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width, generator=generator) * 2)
    x = torch.randn(rows, width, generator=generator) * 3
    with torch.no_grad():  # the module's weight is a parameter
        for dtype in (torch.float32, torch.bfloat16):
            module = norm.to(dtype)
            want, got = module(x.to(dtype)), kernels.rms_norm(x.to(dtype), module.weight, module.variance_epsilon)
            assert got.dtype == dtype and got.shape == want.shape
            if dtype == torch.float32:
                assert torch.allclose(got, want, rtol=5e-7, atol=0)
            else:
                step = want.float().abs() * 2**-6
                assert ((got.float() - want.float()).abs() <= step).all()
                assert (got != want).float().mean() <= 0.01
        wide = x.double()
        want = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
        got = kernels.rms_norm(wide, norm.weight.double(), 1e-5)
    assert torch.allclose(got, want, rtol=1e-14, atol=0)


def test_rms_norm_takes_strided_rows_and_refuses_a_wrong_weight(kernels):
    fused = torch.randn(4, 3 * 64)
    heads = fused[:, :128].view(4, 2, 64)  # qwen3's per-head norm gets a view of the fused projection
    weight = torch.rand(64)
    want = torch.nn.functional.rms_norm(heads, (64,), eps=1e-6) * weight
    assert torch.allclose(kernels.rms_norm(heads, weight, 1e-6), want, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="the weight must be"):
        kernels.rms_norm(heads, torch.rand(32), 1e-6)
    with pytest.raises(RuntimeError, match="the weight must be"):
        kernels.rms_norm(heads, weight.double(), 1e-6)


def test_kernels_that_cannot_build_leave_torchs_ops(monkeypatch, caplog, tmp_path):
    from torch.utils import cpp_extension

    def fail(**_):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", fail)
    cpu_kernels.cpu_kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
            model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "tiny")).eval()
            runner = DecoderRunner(model, 4, cpu_kernels=True)
        assert runner.kernels is None and runner._decode_kernel is None
        assert "keeps torch's ops" in caplog.text and "Ninja is required" in caplog.text
        runner.forward(None, [Prefill(0, torch.randn(3, 32), 8)])
        assert runner.forward(torch.randn(1, 32), [])[0].shape == (1, 32)
    finally:
        cpu_kernels.cpu_kernels.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rope_rounds_as_the_family_does(kernels, dtype):
    """Bit for bit the family's `apply_rotary_pos_emb`, q read from a strided view as the fused projection leaves it."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

    tokens, heads, d = 37, 3, 64
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=heads * d, num_attention_heads=heads))
    generator = torch.Generator().manual_seed(0)
    fused = (torch.randn(tokens, 5 * heads * d, generator=generator) * 4).to(dtype)
    q = fused[:, heads * d : 2 * heads * d].view(tokens, heads, d)
    positions = torch.arange(tokens) * 7 % 300
    cos, sin = rotary(q[None], positions[None])
    want, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos, sin)
    got = kernels.rope(q, cos[0], sin[0])
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got, want[0].transpose(0, 1))
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        kernels.rope(q, cos[0, :5], sin[0, :5])


def _product(x, weight, bias):
    return x.double() @ weight.double().T + (0 if bias is None else bias.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 37, 70), (6, 16, 8), (7, 100, 576), (49, 33, 64), (130, 1536, 96)])
def test_linear_equals_the_product(kernels, dtype, m, n, k):
    """Row counts around the 6-row tiles and the 48-row blocks, outputs not a multiple of a panel, rows apart."""
    generator = torch.Generator().manual_seed(m * n)
    weight = torch.randn(n, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator)
    x = torch.randn(m, k + 3, generator=generator).to(dtype)[:, :k]  # each row 3 elements after the last
    packed = kernels.pack_linear(weight)
    for b in (None, bias):
        got = kernels.linear(x, packed, n, b, "none", None, "")
        want = _product(x, weight, b)
        assert got.dtype == dtype and got.shape == (m, n)
        if dtype == torch.float32:
            assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
        else:  # exact products and fp32 sums, rounded once: within a bf16 step (1/128 relative) of the exact one
            assert ((got.double() - want).abs() <= want.abs() / 128 + 1e-4 * want.abs().max()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_epilogues(kernels, dtype):
    """SiLU, then a residual added or a gate multiplied, in fp32 before the one rounding."""
    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(40, 24, generator=generator).to(dtype), torch.randn(40, generator=generator)
    x, other = torch.randn(9, 24, generator=generator).to(dtype), torch.randn(9, 40, generator=generator).to(dtype)
    packed, product = kernels.pack_linear(weight), _product(x, weight, bias)
    cases = {
        ("swish", ""): F.silu(product),
        ("none", "add"): product + other.double(),
        ("none", "mul"): product * other.double(),
        ("swish", "mul"): F.silu(product) * other.double(),
    }
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for (activation, how), want in cases.items():
        got = kernels.linear(x, packed, 40, bias, activation, other if how else None, how)
        assert (got.double() - want).abs().max() <= tolerance * want.abs().max(), (activation, how)


def test_linear_of_no_rows(kernels):
    packed = kernels.pack_linear(torch.randn(40, 24))
    got = kernels.linear(torch.empty(0, 24), packed, 40, torch.randn(40), "swish", None, "")
    assert got.shape == (0, 40)


def test_linear_refuses_what_does_not_fit(kernels):
    weight = torch.randn(40, 24)
    packed, x = kernels.pack_linear(weight), torch.randn(3, 24)
    with pytest.raises(RuntimeError, match="must come from pack_linear"):
        kernels.linear(x, weight, 40, None, "none", None, "")
    with pytest.raises(RuntimeError, match="must come from pack_linear"):
        kernels.linear(torch.randn(3, 25), packed, 40, None, "none", None, "")
    with pytest.raises(RuntimeError, match="in the weight's dtype"):
        kernels.linear(x.bfloat16(), packed, 40, None, "none", None, "")
    with pytest.raises(RuntimeError, match="activation none or swish"):
        kernels.linear(x, packed, 40, None, "gelu", None, "")
    with pytest.raises(RuntimeError, match="goes with"):
        kernels.linear(x, packed, 40, None, "none", None, "add")
    with pytest.raises(RuntimeError, match="bias must be"):
        kernels.linear(x, packed, 40, torch.randn(40).double(), "none", None, "")
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        kernels.pack_linear(weight.double())


def test_the_avx2_build_computes_alike():
    """The AVX2 build (CPUs without AVX-512, such as the AVX2-only EPYC) on this machine, with torch told to run
    at AVX2: its decode attention against SDPA, its rope against the family's and its GEMM (which the projections
    use there) against the product, in a process of their own."""
    import os
    import subprocess
    import sys

    check = """
import torch, torch.nn.functional as F
from model_server.runners.cpu_kernels import cpu_kernels
assert torch.backends.cpu.get_cpu_capability() == "AVX2"
kernels = cpu_kernels()
g = torch.Generator().manual_seed(0)
keys, values = torch.randn(4, 2, 40, 64, generator=g), torch.randn(4, 2, 40, 64, generator=g)
q, k, v = torch.randn(3, 2, 3, 64, generator=g), torch.randn(3, 2, 64, generator=g), torch.randn(3, 2, 64, generator=g)
positions = torch.tensor([0, 17, 39])
got = kernels.decode_attention(q, k, v, keys, values, positions, 0.125)
visible = (torch.arange(40)[None, :] <= positions[:, None])[:, None, None, :]
want = F.scaled_dot_product_attention(q.double(), keys[:3].double(), values[:3].double(), attn_mask=visible)
assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()
x = torch.randn(5, 4, 64, generator=g).bfloat16()
cos, sin = torch.randn(5, 64, generator=g).bfloat16(), torch.randn(5, 64, generator=g).bfloat16()
rotated = torch.cat((-x[..., 32:], x[..., :32]), -1)
assert torch.equal(kernels.rope(x, cos, sin), x * cos[:, None] + rotated * sin[:, None])
from model_server.runners.packed import own_gemm
from model_server.specs import load_spec
assert own_gemm(load_spec("smollm2-gircse")) is kernels
weight, x = torch.randn(70, 48, generator=g), torch.randn(13, 48, generator=g)
want = x.double() @ weight.double().T
got = kernels.linear(x, kernels.pack_linear(weight), 70, None, "none", None, "")
assert kernels.pack_linear(weight).shape == (5, 48, 16)  # panels of 16 outputs at AVX2
assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
print("ok")
"""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
