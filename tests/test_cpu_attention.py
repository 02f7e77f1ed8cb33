"""The CPU decode-attention kernel (`model_server/runners/cpu_attention.cpp`), compiled here as the worker compiles
it: against SDPA over the same pool, inside the runner's decode steps, and its fallback where it cannot build.
(The fidelity tests run on it too: `auto`, the default, attends through it on the CPU.)"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from model_server.runners import cpu_attention
from model_server.runners.base import Prefill
from model_server.runners.fast import DecoderRunner
from tests.models import make_tiny_llama

# (dtype, how far from an fp64 reference the kernel may be, relative to the largest output)
TOLERANCES = [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)]


@pytest.fixture(scope="module")
def kernel():
    built = cpu_attention.decode_kernel()
    assert built is not None, "the kernel must build on the CI machines (AVX2, gcc, ninja)"
    return built


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
def test_runner_decodes_alike_on_the_kernel_and_on_sdpa(tmp_path, kernel, dtype):
    """Prompts of different lengths prefill, then decode steps while a sequence joins and one leaves, on both
    paths: the same states."""
    directory = make_tiny_llama(tmp_path / "tiny")
    runners = {
        how: DecoderRunner(AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval(), 8, attention=how)
        for how in ("auto", "sdpa")
    }
    assert runners["auto"]._decode_kernel is not None and runners["sdpa"]._decode_kernel is None
    generator = torch.Generator().manual_seed(0)

    def rows(n):
        return torch.randn(n, 32, generator=generator).to(dtype)

    first = [Prefill(i, rows(n), 32) for i, n in enumerate((5, 11, 3))]
    # (decode rows, a joining prompt) per pass, or a sequence leaving
    plan = [(rows(3), []), (rows(3), [Prefill(3, rows(7), 32)]), (rows(4), []), 1, (rows(3), []), (rows(3), [])]
    outputs = {how: [] for how in runners}
    for how, runner in runners.items():
        runner.forward(None, first)
        for step in plan:
            if isinstance(step, int):
                runner.remove([step])
                continue
            decoded, _ = runner.forward(*step)
            outputs[how].append(decoded)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for got, want in zip(outputs["auto"], outputs["sdpa"], strict=True):
        assert (got.float() - want.float()).abs().max() <= tolerance * want.float().abs().max()


def test_a_kernel_that_cannot_build_leaves_sdpa(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def fail(**_):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", fail)
    cpu_attention.decode_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_attention.__name__):
            assert cpu_attention.decode_kernel() is None
        assert "decode attention runs on SDPA" in caplog.text and "Ninja is required" in caplog.text
    finally:
        cpu_attention.decode_kernel.cache_clear()
