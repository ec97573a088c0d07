"""int8 inference (int8.py) against float32, and impl=auto's crossover (crossover.py)."""
import pytest
import torch
from torch import nn

from d2dmoe import crossover
from d2dmoe.int8 import Int8Experts, converted_int8, dense_int8
from d2dmoe.crossover import set_impl
from d2dmoe.moe import FFN, MoE, Router, fastest

# int8 weights (per row) and 7-bit activations (per call) against float32, on random weights:
# the relative L2 error of a layer's output stays under this
INT8_TOLERANCE = 0.05


def random_moe(gated=False, d=32, f=128, E=8, seed=0, act=nn.GELU):
    torch.manual_seed(seed)
    up = nn.Linear(d, f, bias=False) if gated else None
    ffn = FFN(nn.Linear(d, f), nn.Linear(f, d), act(), up)
    return MoE.from_ffn(ffn, list(torch.arange(f).chunk(E)), Router(d, E, 16))


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def masks(E=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(4, 16, E, generator=gen) < 0.3
    cases = {"random": mask.clone()}
    mask[..., 2] = False
    cases["expert_without_tokens"] = mask.clone()
    mask[1, 3] = True
    cases["token_with_every_expert"] = mask.clone()
    cases["one_each"] = torch.zeros_like(mask).scatter_(-1, torch.randint(0, E, (4, 16, 1), generator=gen), True)
    return cases


@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU])  # ReLU runs inside the int8 kernel
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", ["random", "expert_without_tokens", "token_with_every_expert", "one_each"])
def test_int8_experts_follow_the_float32_experts(gated, case, act):
    """Both int8 executions give the float32 masked output within the tolerance, and each other's
    (the same int8 weights; only the activations' quantization differs)."""
    moe = random_moe(gated, act=act)
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(2))
    mask = masks()[case]
    q = Int8Experts(moe)
    with torch.no_grad():
        ref = moe.masked(x, mask)
        masked, gathered = q.execute(x, mask, "masked"), q.execute(x, mask, "gather")
    assert relative_error(masked, ref) < INT8_TOLERANCE
    assert relative_error(gathered, ref) < INT8_TOLERANCE
    assert relative_error(gathered, masked) < INT8_TOLERANCE


@pytest.mark.parametrize("impl", ["masked", "gather"])
def test_the_relu_inside_the_int8_kernel_gives_what_the_relu_module_gives(impl):
    """A plain ReLU runs inside quantized.linear_relu_dynamic; with a hook on it (what sparsity
    statistics register) the module runs instead. Both give the same numbers, exactly."""
    moe = random_moe(act=nn.ReLU)
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(2))
    mask = masks()["random"]
    q = Int8Experts(moe)
    with torch.no_grad():
        fused = q.execute(x, mask, impl)
        seen = []
        handle = moe.act.register_forward_hook(lambda m, args, out: seen.append(out.shape))
        unfused = q.execute(x, mask, impl)
        handle.remove()
    assert seen  # the hooked module ran
    torch.testing.assert_close(fused, unfused, rtol=0, atol=0)


def test_int8_gather_with_no_pairs_gives_the_output_bias():
    moe = random_moe()
    x = torch.randn(2, 3, 32)
    out = Int8Experts(moe).execute(x, torch.zeros(2, 3, 8, dtype=torch.bool), "gather")
    torch.testing.assert_close(out, moe.b2.detach().expand(2, 3, 32))


class TinyModel(nn.Module):
    """A linear layer, then a MoE layer, then a head: what a converted model holds."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.moe, self.head = nn.Linear(32, 32), random_moe(), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.moe(torch.relu(self.proj(x))))


def test_converted_int8_quantizes_all_but_the_routers_and_follows_float32():
    model = TinyModel().eval()
    x = torch.randn(4, 16, 32)
    with torch.no_grad():
        ref = model(x)
    q = converted_int8(model)
    assert type(q.proj).__name__ == "Linear" and type(q.head).__name__ == "Linear"  # quantized modules
    assert type(q.proj).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert type(q.moe.router.net[0]) is nn.Linear  # routers stay float32: they select as trained
    assert q.moe.int8 is not None and model.moe.int8 is None  # a copy; the original is untouched
    assert type(model.proj) is nn.Linear
    with torch.no_grad():
        out = q(x)
    assert torch.equal(q.moe.last_mask, model.moe.last_mask)  # the same routing
    assert relative_error(out, ref) < INT8_TOLERANCE
    with torch.enable_grad():  # with gradients on, the experts run in float32 again
        torch.testing.assert_close(q.moe(torch.relu(q.proj(x))), model.moe(torch.relu(q.proj(x))))


def test_dense_int8_quantizes_every_linear():
    model = TinyModel()
    q = dense_int8(model)
    assert all(type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") for m in (q.proj, q.head))
    assert type(q.moe.router.net[0]).__module__.startswith("torch.ao.nn.quantized.dynamic")


def fake_timer(selective_ms_per_fraction, masked_ms):
    """Times that depend on the executed fraction only, as a machine's would."""
    def timer(moe, x, mask, impl):
        fraction = mask.float().mean().item()
        return selective_ms_per_fraction * fraction if impl != "masked" else masked_ms
    return timer


def test_the_table_holds_the_fastest_execution_per_fraction_and_calls_take_the_nearest():
    moe = random_moe(f=160, E=20)  # fractions of 20 experts hit the ladder exactly
    # selective costs 10 ms x fraction, masked 4 ms: faster up to 0.3, not from 0.4
    table = crossover.measure(moe, ("masked", "gather"), tokens=8, timer=fake_timer(10, 4))
    assert [f for f, _ in table] == [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
    assert [impl for f, impl in table if f <= 0.3] == ["gather"] * 5
    assert {impl for f, impl in table if f >= 0.4} == {"masked"}
    assert fastest(table, 0.34) == "gather" and fastest(table, 0.36) == "masked"
    # faster at every fraction short of every expert
    table = crossover.measure(moe, ("masked", "gather"), tokens=8, timer=fake_timer(1, 4))
    assert fastest(table, 0.85) == "gather" and fastest(table, 0.95) == "masked"
    # slower already at 1 of 20 experts: masked everywhere
    table = crossover.measure(moe, ("masked", "gather"), tokens=8, timer=fake_timer(100, 4))
    assert {impl for _, impl in table} == {"masked"}


def test_auto_runs_the_fastest_execution_for_each_call(monkeypatch):
    moe = random_moe()
    monkeypatch.setattr(crossover, "TABLES", {})
    measured = []
    monkeypatch.setattr(crossover, "measure", lambda m, impls: measured.append(impls) or [(0.1, "gather"), (0.4, "masked")])
    set_impl(moe, "auto")
    set_impl(moe, "auto")
    assert measured == [("masked", "gather")]  # once per key
    calls = []
    monkeypatch.setattr(moe, "gathered", lambda x, m: calls.append("gather") or MoE.gathered(moe, x, m))
    monkeypatch.setattr(moe, "masked", lambda x, m: calls.append("masked") or MoE.masked(moe, x, m))
    x = torch.randn(2, 4, 32)
    few = torch.zeros(2, 4, 8, dtype=torch.bool)
    few[..., 0] = True  # 1/8 of the experts
    many = torch.ones(2, 4, 8, dtype=torch.bool)
    many[0, 0, 1:] = False  # 57/64: not all
    with torch.no_grad():
        for mask in (few, many):
            moe.gate = lambda scores, m=mask: m
            torch.testing.assert_close(moe(x), MoE.masked(moe, x, mask), rtol=1e-5, atol=1e-6)
    assert calls == ["gather", "masked"]


def test_int8_layers_choose_among_int8_and_float32_executions(monkeypatch):
    model = TinyModel()
    monkeypatch.setattr(crossover, "TABLES", {})
    q = converted_int8(model)
    set_impl(q, "auto")
    impls = {impl for _, impl in q.moe.fastest}
    assert impls <= {"masked", "gather", "gather_float"}
    x = torch.randn(2, 4, 32)
    mask = torch.rand(2, 4, 8) < 0.3
    with torch.no_grad():  # gather_float runs the float32 experts, exactly
        torch.testing.assert_close(q.moe.execute(x, mask, "gather_float"), model.moe.masked(x, mask),
                                   rtol=1e-5, atol=1e-5)


def test_auto_measures_on_this_machine():
    """The real timer fills the table with known executions, and auto's outputs equal masked."""
    moe = random_moe()
    moe.fastest = crossover.measure(moe, ("masked", "gather"), tokens=64)
    assert {impl for _, impl in moe.fastest} <= {"masked", "gather"} and moe.fastest[-1] == (1.0, "masked")
    moe.impl = "auto"
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        out = moe(x)
        torch.testing.assert_close(out, moe.masked(x, moe.last_mask), rtol=1e-5, atol=1e-6)


def test_auto_without_a_measured_table_says_so():
    moe = random_moe()
    moe.impl = "auto"
    with pytest.raises(RuntimeError, match="timed first"), torch.no_grad():
        moe(torch.randn(1, 2, 32))


def test_calibrate_times_each_layer_on_its_own_inputs_and_routing():
    model = TinyModel().eval()
    x = torch.randn(4, 16, 32)
    gate, timed = model.moe.gate, []

    def timer(moe, xs, mask, impl):  # selective faster below 40% of the experts
        timed.append((xs.shape, mask.shape))
        return 10 * mask.float().mean().item() if impl != "masked" else 4

    crossover.calibrate(model, lambda: model(x), [0.0, 0.2, 0.5, 1.0], timer=timer)
    assert model.moe.gate is gate and model.moe.impl == "auto"  # restored; set to auto
    assert timed[0] == ((4, 16, 32), (4, 16, 8))  # the layer's own input and mask, not random ones
    table = model.moe.fastest
    assert table[-1] == (1.0, "masked") and len(table) == 4  # tau 0 runs every expert: nothing to time
    assert [f for f, _ in table] == sorted(f for f, _ in table)
    assert all(impl == ("gather" if f < 0.4 else "masked") for f, impl in table[:-1])
