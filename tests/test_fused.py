"""The fused Triton expert kernel (experts.impl=fused) against the masked execution.

Without a GPU the kernel is checked two ways: it runs in Triton's CPU interpreter (TRITON_INTERPRET=1,
which must be set before triton is imported, hence a subprocess running this file), and it compiles
for an sm_90 GPU with Triton's own compiler. With CUDA it also runs on the GPU."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")

from d2dmoe.crossover import set_impl  # noqa: E402
from d2dmoe.moe import FFN, MoE, Router  # noqa: E402

# (d, d_ff, experts, activation, gated): expert sizes 12 (under one 16-wide tile), 40 (not a power
# of two) and 96 (two 64-wide tiles); widths 100 and 72 are not multiples of the 32-wide d tile
CASES = [
    (100, 72, 6, nn.ReLU(), False),
    (72, 240, 6, nn.GELU(), False),
    (100, 192, 2, nn.SiLU(), True),
    (72, 96, 8, nn.GELU(approximate="tanh"), True),
]


def layer(d, d_ff, experts, act, gated):
    torch.manual_seed(0)
    up = nn.Linear(d, d_ff, bias=False) if gated else None
    ffn = FFN(nn.Linear(d, d_ff), nn.Linear(d_ff, d), act, up)
    return MoE.from_ffn(ffn, list(torch.arange(d_ff).chunk(experts)), Router(d, experts, 8))


def masks(experts, shape=(3, 23)):
    """Random routing, plus an expert no token selects and a token that selects every expert."""
    torch.manual_seed(1)
    random = torch.rand(*shape, experts) < 0.4
    edge = random.clone()
    edge[..., 1] = False
    edge[0, 5] = True
    return [random, edge, torch.zeros_like(random)]


def check_fused_equals_masked(device: str = "cpu") -> None:
    for case in CASES:
        moe = layer(*case).to(device)
        set_impl(moe, "fused")
        for mask in masks(case[2]):
            mask = mask.to(device)
            moe.gate = lambda scores, m=mask: m
            x = torch.randn(*mask.shape[:-1], case[0], device=device)
            with torch.inference_mode():
                fused = moe(x)
                torch.testing.assert_close(fused, moe.masked(x, mask), rtol=1e-4, atol=1e-4)
            with torch.enable_grad():  # gradients on: fused runs as the autograd gather
                out = moe(x)
                assert out.grad_fn is not None
                torch.testing.assert_close(out, moe.masked(x, mask), rtol=1e-4, atol=1e-4)


# Triton's interpreter runs the kernel in float16 but not in bfloat16: it stores bfloat16 as the raw
# uint16 bits and its tl.dot multiplies those bit patterns as integers (triton 3.8.0, no error raised;
# 1.0 @ 0.5 over 16 terms gives 4194828288.0, not 8.0). Triton's debugging guide lists bfloat16 as
# unsupported in the interpreter; so bfloat16 is checked on a GPU only.
INTERPRETED_DTYPES = (torch.float16,)


def check_low_precision(dtypes, device: str = "cpu") -> None:
    """Weights and inputs in float16/bfloat16, against the masked execution in float32 on the same
    (already rounded) values, so that only the kernel's own rounding is measured. The kernel multiplies
    exactly and accumulates in float32; it rounds twice, each within u = eps/2 relative (half a unit in
    the last place of the dtype): the hidden activations h before the second matmul, and the output.
    So per output i, |fused - exact| <= u (|exact_i| + sum_j |h_j| |w2_ij|), a bound that scales with
    the dtype (bfloat16's u is 8x float16's). 5% on top covers float32's own rounding, in the kernel and
    in the reference (2^-24 per operation, far below float16's u = 2^-11). Tight on purpose: the kernel
    measures 0.76 of it here, and accumulating the output in float16 instead goes over (1.15)."""
    for dtype in dtypes:
        u = torch.finfo(dtype).eps / 2
        for case in CASES:
            moe = layer(*case).to(device, dtype)
            set_impl(moe, "fused")
            exact = copy.deepcopy(moe).float()
            w2 = exact.w2.transpose(0, 1).reshape(exact.d, -1)  # [d, E*s]
            for mask in masks(case[2]):
                mask = mask.to(device)
                moe.gate = lambda scores, m=mask: m
                x = torch.randn(*mask.shape[:-1], case[0], device=device).to(dtype)
                with torch.inference_mode():
                    fused = moe(x)
                    ref = exact.masked(x.float(), mask)
                    h = exact.hidden(x.float()) * mask.unsqueeze(-1)  # [B, T, E, s], unselected experts 0
                    bound = 1.05 * u * (ref.abs() + h.abs().flatten(-2) @ w2.abs().T) + 1e-6
                assert fused.dtype == dtype
                excess = ((fused.float() - ref).abs() - bound).max().item()
                assert excess <= 0, f"{dtype} {case}: {excess} over the rounding bound"


def check_fused_in_cuda_graph() -> None:
    """The fused path never waits on the host, so a layer with a real dynamic-k gate can be captured
    in a CUDA graph; replayed on new inputs, it gives what eager execution gives."""
    from d2dmoe.fused import capture
    from d2dmoe.moe import DynamicKGate

    moe = layer(*CASES[2]).to("cuda")
    set_impl(moe, "fused")
    moe.gate = DynamicKGate(0.3)
    x = torch.randn(4, 50, CASES[2][0], device="cuda")
    with torch.inference_mode():
        graph, captured = capture(lambda: moe(x))
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.testing.assert_close(captured, moe(x), rtol=1e-5, atol=1e-5)  # atomics add in any order


def check_converted_models() -> None:
    """Whole converted models (BERT with its attention projections converted too; a gated LLaMA):
    fused gives the gather outputs."""
    from d2dmoe.export import ConvertedModel
    from tests.test_attention import batch_for
    from tests.test_export import converted

    for family, attention in (("bert", True), ("llama", False)):
        adapter, net, spec = converted(family, attention)
        model = ConvertedModel.wrap(net, adapter, spec)
        batch = batch_for("gpt2" if family == "llama" else family)
        with torch.inference_mode():
            gathered = model.run(batch)
            model.set_impl("fused")
            torch.testing.assert_close(model.run(batch), gathered, rtol=1e-4, atol=1e-4)


def test_fused_equals_masked_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "tests.test_fused"], env=env, capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "fused == masked, float16 within its rounding bound, bfloat16 refused" in run.stdout


def compile_for_sm90(act, gated, dtype, S, config):
    """Triton's compiler takes the kernel, launched as fused_experts launches it, all the way to an
    sm_90 binary, with no GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from d2dmoe.fused import _experts_kernel, block_s

    signature = {name: f"*{dtype}" for name in ("x_ptr", "w1_ptr", "b1_ptr", "up_ptr", "w2_ptr")}
    signature |= {"tokens_ptr": "*i32", "counts_ptr": "*i32", "out_ptr": "*fp32", "N": "i32", "D": "i32", "S": "i32"}
    constants = {"ACT": act, "GATED": gated, "PRECISION": "tf32", "BLOCK_S": block_s(S), **config.kwargs}
    signature |= {name: "constexpr" for name in constants}
    kernel = triton.compile(ASTSource(_experts_kernel, signature, constexprs=constants),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})
    assert kernel.asm["cubin"]
    return kernel


@pytest.mark.parametrize("act,gated,dtype,S", [("relu", False, "fp32", 12), ("relu", False, "fp32", 96),
                                               ("gelu", True, "bf16", 24), ("gelu_tanh", False, "fp16", 40),
                                               ("silu", True, "fp32", 64), ("silu", True, "bf16", 128)])
def test_fused_kernel_compiles_for_gpu_without_spills(act, gated, dtype, S, tmp_path):
    """The first tile configuration (the interpreter's, and autotuning's fallback) compiles with no
    register spills by the ptxas Triton bundles."""
    from d2dmoe.fused import CONFIGS

    kernel = compile_for_sm90(act, gated, dtype, S, CONFIGS[0])
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton ships no ptxas here")
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    assert "0 bytes spill stores" in report, report


@pytest.mark.parametrize("act,gated,dtype,S", [("relu", False, "fp32", 96), ("silu", True, "bf16", 128)])
def test_every_autotuning_config_compiles_for_gpu(act, gated, dtype, S):
    from d2dmoe.fused import CONFIGS

    for config in CONFIGS[1:]:
        compile_for_sm90(act, gated, dtype, S, config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_equals_masked_on_gpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    check_fused_equals_masked("cuda")
    check_low_precision((torch.float16, torch.bfloat16), "cuda")  # bfloat16 runs nowhere else


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_layer_runs_in_a_cuda_graph():
    check_fused_in_cuda_graph()


def test_fused_needs_a_gpu_and_a_known_activation(monkeypatch):
    from d2dmoe import fused

    moe = layer(*CASES[0])
    monkeypatch.setattr(fused, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        set_impl(moe, "fused")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, but the layer left on the CPU
    set_impl(moe, "fused")
    with pytest.raises(ValueError, match="input is on cpu"), torch.inference_mode():
        moe(torch.randn(2, 3, CASES[0][0]))
    monkeypatch.setattr(fused, "INTERPRET", True)
    moe.act = nn.Tanh()
    with pytest.raises(ValueError, match="Tanh"):
        set_impl(moe, "fused")


def test_fused_config_fails_before_compute_without_a_gpu(monkeypatch):
    from d2dmoe import fused
    from d2dmoe.validate import ConfigError, check_config
    from tests.conftest import compose_config

    monkeypatch.setattr(fused, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU") as err:
        check_config(compose_config(["experts.impl=fused"]))
    assert err.value.key == "experts.impl"


def test_activation_found_by_value():
    from transformers.activations import GELUActivation, NewGELUActivation

    from d2dmoe.fused import activation_name

    assert activation_name(GELUActivation()) == "gelu"
    assert activation_name(NewGELUActivation()) == "gelu_tanh"
    assert activation_name(nn.ReLU()) == "relu"


if __name__ == "__main__":  # the interpreter check, in its own process
    check_fused_equals_masked()
    check_converted_models()
    check_low_precision(INTERPRETED_DTYPES)
    try:  # bfloat16 stops with an error instead of the interpreter's wrong numbers
        check_low_precision((torch.bfloat16,))
    except ValueError as err:
        assert "multiplies bfloat16 as raw integer bits" in str(err)
    else:
        raise AssertionError("bfloat16 ran in the interpreter")
    print("fused == masked, float16 within its rounding bound, bfloat16 refused")
