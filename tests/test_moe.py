"""MoE layer, gates and router targets against independent references."""
import pytest
import torch
from torch import nn

from d2dmoe.moe import FFN, MoE, AllExperts, DynamicKGate, Router, TopKGate
from d2dmoe.phases.split import balanced_clusters


def random_ffn(d=16, f=48, act=None):
    torch.manual_seed(0)
    return FFN(nn.Linear(d, f), nn.Linear(f, d), act or nn.ReLU())


def split_ffn(ffn, num_experts):
    experts = balanced_clusters(ffn.w1.weight, num_experts, seed=0, n_init=1)
    return MoE.from_ffn(ffn, experts, Router(ffn.w1.in_features, num_experts, 8)), experts


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU()])
def test_all_experts_equal_dense_ffn(act):
    ffn = random_ffn(act=act)
    moe, _ = split_ffn(ffn, 6)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(moe(x), ffn(x), rtol=1e-5, atol=1e-6)
    assert moe.last_mask.all()


def test_experts_outputs_sum_to_dense():
    """Each expert computed alone by hand from the dense weights; their sum plus b2 is the FFN."""
    ffn = random_ffn()
    moe, experts = split_ffn(ffn, 4)
    x = torch.randn(7, 16)
    total = ffn.w2.bias.clone()
    for idx in experts:
        h = torch.relu(x @ ffn.w1.weight[idx].T + ffn.w1.bias[idx])
        total = total + h @ ffn.w2.weight[:, idx].T
    torch.testing.assert_close(moe(x[None])[0], total, rtol=1e-5, atol=1e-6)


def test_split_is_a_partition_into_equal_experts():
    w1 = torch.randn(96, 10)
    experts = balanced_clusters(w1, 8, seed=0, n_init=1)
    assert len(experts) == 8
    assert all(len(e) == 12 for e in experts)
    assert sorted(torch.cat(experts).tolist()) == list(range(96))


def test_split_groups_similar_neurons():
    """Rows drawn around 4 well-separated directions must come out as exactly those 4 groups."""
    torch.manual_seed(0)
    centres = torch.eye(4, 12) * 10
    w1 = centres.repeat_interleave(5, 0) + 0.1 * torch.randn(20, 12)
    experts = balanced_clusters(w1, 4, seed=0, n_init=1)
    assert sorted(sorted((e // 5).tolist()) for e in experts) == [[g] * 5 for g in range(4)]


def test_router_targets_are_expert_output_norms():
    ffn = random_ffn()
    moe, experts = split_ffn(ffn, 4)
    x = torch.randn(9, 16)
    by_hand = torch.stack([
        (torch.relu(x @ ffn.w1.weight[idx].T + ffn.w1.bias[idx]) @ ffn.w2.weight[:, idx].T).norm(dim=-1)
        for idx in experts], dim=-1)
    torch.testing.assert_close(moe.expert_norms(x, chunk=4), by_hand, rtol=1e-5, atol=1e-6)


def test_router_shape_and_sign():
    router = Router(16, 6, hidden=128)
    first, act, second = router.net
    assert (first.in_features, first.out_features, first.bias) == (16, 128, None)
    assert (second.in_features, second.out_features, second.bias) == (128, 6, None)
    assert isinstance(act, nn.ReLU)
    assert (router(torch.randn(4, 16)) >= 0).all()


def test_regression_router_scores_are_the_absolute_outputs():
    """abs, not relu: a negative output is a large score too, and keeps its gradient."""
    torch.manual_seed(0)
    router = Router(16, 6, hidden=32)
    x = torch.randn(50, 16)
    out = router.logits(x)
    assert (out < 0).any()
    assert torch.equal(router(x), out.abs())


def test_moefication_router_has_the_same_parameters_with_tanh_and_sigmoid_scores():
    torch.manual_seed(0)
    regression = Router(16, 6, hidden=32)
    moefication = Router(16, 6, hidden=32, kind="moefication")
    moefication.load_state_dict(regression.state_dict())  # one split artifact serves both kinds
    assert isinstance(moefication.net[1], nn.Tanh)
    x = torch.randn(5, 16)
    logits = moefication.net[2](torch.tanh(moefication.net[0](x)))
    torch.testing.assert_close(moefication(x), torch.sigmoid(logits))
    with pytest.raises(ValueError, match="unknown router kind 'softmax'"):
        Router(16, 6, kind="softmax")


def test_moefication_original_router_starts_as_centroid_similarity_selection():
    """Started at its centroids, MoEfication's own router ranks each token's experts by the inner
    product of the unit-normalised token with the mean unit-normalised W1 row of each expert,
    computed here from the FFN's neurons and the split's assignment."""
    torch.manual_seed(0)
    d, d_ff, E = 12, 24, 6
    ffn = FFN(nn.Linear(d, d_ff), nn.Linear(d_ff, d), nn.ReLU())
    experts = list(torch.randperm(d_ff).chunk(E))
    router = Router(d, E, hidden=E, kind="moefication_original")
    moe = MoE.from_ffn(ffn, experts, router)
    router.start_at_centroids(moe.w1)
    x = torch.randn(2, 5, d) * 7  # the scale must not matter: the router sees the unit-normalised input
    rows = ffn.w1.weight.detach() / ffn.w1.weight.detach().norm(dim=1, keepdim=True)  # [d_ff, d]
    centroids = torch.stack([rows[idx].mean(0) for idx in experts])  # [E, d]
    similarity = (x / x.norm(dim=-1, keepdim=True)) @ centroids.T  # [2, 5, E]
    torch.testing.assert_close(router.logits(x), torch.tanh(similarity))
    for k in (1, 3):
        assert torch.equal(TopKGate(k)(router(x)), TopKGate(k)(similarity))
    with pytest.raises(ValueError, match="as wide as its 6 experts, not 8"):
        Router(d, E, hidden=8, kind="moefication_original")


@pytest.fixture
def scores():
    torch.manual_seed(1)
    return torch.rand(4, 7, 16)  # [B, T, E]


def test_dynk_extremes(scores):
    assert DynamicKGate(0.0)(scores).all()
    top = DynamicKGate(1.0)(scores)
    assert torch.equal(top, scores == scores.amax(-1, keepdim=True))
    assert (top.sum(-1) == 1).all()


def test_dynk_count_never_increases_with_tau(scores):
    counts = [DynamicKGate(t)(scores).sum(-1) for t in torch.linspace(0, 1, 21).tolist()]
    for a, b in zip(counts, counts[1:]):
        assert (b <= a).all()


def test_dynk_rule_elementwise(scores):
    mask = DynamicKGate(0.6)(scores)
    expected = scores >= 0.6 * scores.max(-1, keepdim=True).values
    assert torch.equal(mask, expected)


def test_at_least_one_expert_runs():
    zeros = torch.zeros(2, 3, 5)
    for gate in (DynamicKGate(0.0), DynamicKGate(0.5), DynamicKGate(1.0), TopKGate(1)):
        assert (gate(zeros).sum(-1) >= 1).all()
    assert (DynamicKGate(1.0)(torch.rand(50, 5)).sum(-1) >= 1).all()


@pytest.mark.parametrize("k", [1, 3, 16])
def test_topk_selects_exactly_k_largest(scores, k):
    mask = TopKGate(k)(scores)
    assert (mask.sum(-1) == k).all()
    kth = scores.topk(k, -1).values[..., -1:]
    assert (scores[mask] >= kth.expand_as(scores)[mask]).all()


@pytest.mark.parametrize("tau", [-0.01, 1.01, float("nan"), "0.5", None, True])
def test_dynk_gate_rejects_a_tau_outside_0_1(tau):
    with pytest.raises(ValueError, match="tau must be a number in \\[0, 1\\]"):
        DynamicKGate(tau)


@pytest.mark.parametrize("tau", [0, 0.0, 0.3, 1, 1.0])
def test_dynk_gate_takes_any_tau_in_0_1(tau):
    assert DynamicKGate(tau).tau == float(tau)


@pytest.mark.parametrize("k", [0, -1, 1.5, "2", None, True])
def test_topk_gate_rejects_a_k_below_1_or_not_whole(k):
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        TopKGate(k)


@pytest.mark.parametrize("k", [1, 7, 1000])
def test_topk_gate_takes_any_k_from_1(k):
    scores = torch.rand(3, 7)
    assert (TopKGate(k)(scores).sum(-1) == min(k, 7)).all()  # k >= E: every expert


EDGE_GATES = [DynamicKGate(0.0), DynamicKGate(0.5), DynamicKGate(1.0), TopKGate(1), TopKGate(3)]


@pytest.mark.parametrize("gate", EDGE_GATES, ids=repr)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_token_with_a_non_finite_score_runs_every_expert(gate, bad):
    """The pinned rule (moe.run_all_if_unscored): that token gets the dense FFN, the others keep
    their own selection."""
    torch.manual_seed(0)
    scores = torch.rand(2, 4, 6)
    expected = gate(scores)
    scores[1, 2, 3] = bad
    mask = gate(scores)
    assert mask[1, 2].all()
    expected[1, 2] = True
    assert torch.equal(mask, expected)


def test_an_moe_whose_router_gives_nan_computes_the_dense_ffn():
    ffn = random_ffn()
    moe, _ = split_ffn(ffn, 4)
    with torch.no_grad():
        moe.router.net[0].weight[0, 0] = float("nan")
    x = torch.randn(2, 5, 16)
    for impl in ("masked", "gather"):
        moe.impl, moe.gate = impl, DynamicKGate(1.0)
        with torch.no_grad():
            torch.testing.assert_close(moe(x), ffn(x), rtol=1e-5, atol=1e-6)
        assert moe.last_mask.all()


def test_all_zero_scores():
    """Every expert ties at the maximum 0: dynamic-k runs them all at every tau; top-k the first k."""
    zeros = torch.zeros(2, 5)
    for tau in (0.0, 0.5, 1.0):
        assert DynamicKGate(tau)(zeros).all()
    assert torch.equal(TopKGate(2)(zeros), torch.tensor([[True, True, False, False, False]] * 2))


def test_ties():
    scores = torch.tensor([[0.5, 0.9, 0.1, 0.9, 0.44]])
    assert DynamicKGate(1.0)(scores).nonzero()[:, 1].tolist() == [1, 3]  # both at the maximum
    assert DynamicKGate(0.5)(scores).nonzero()[:, 1].tolist() == [0, 1, 3]  # 0.44 < 0.5 * 0.9 <= 0.5
    assert TopKGate(1)(scores).nonzero()[:, 1].tolist() == [1]  # the lower index of the tie
    assert TopKGate(2)(scores).nonzero()[:, 1].tolist() == [1, 3]
    assert TopKGate(3)(scores).nonzero()[:, 1].tolist() == [0, 1, 3]


def test_topk_breaks_every_tie_toward_the_lower_index():
    """Against a plain-Python reference: sort by (-score, index), keep k."""
    torch.manual_seed(0)
    scores = torch.randint(0, 3, (200, 9)).float()  # three values: ties everywhere
    for k in (1, 2, 4):
        mask = TopKGate(k)(scores)
        for row, chosen in zip(scores.tolist(), mask.tolist()):
            ranked = sorted(range(9), key=lambda e: (-row[e], e))[:k]
            assert [e for e in range(9) if chosen[e]] == sorted(ranked)


def test_router_needs_a_hidden_width_of_at_least_one():
    with pytest.raises(ValueError, match="hidden width must be >= 1, got 0"):
        Router(16, 4, hidden=0)


def test_gated_moe_runs_only_selected_experts():
    """Zeroing an expert in the gate removes exactly that expert's contribution."""
    ffn = random_ffn()
    moe, experts = split_ffn(ffn, 4)
    x = torch.randn(1, 3, 16)

    class OnlyFirst:
        def __call__(self, s):
            m = torch.zeros_like(s, dtype=torch.bool)
            m[..., 0] = True
            return m

    moe.gate = OnlyFirst()
    idx = experts[0]
    expected = torch.relu(x @ ffn.w1.weight[idx].T + ffn.w1.bias[idx]) @ ffn.w2.weight[:, idx].T + ffn.w2.bias
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-6)
    moe.gate = AllExperts()


def gather_vs_masked(moe, x, mask):
    """Outputs and gradients of both executions under one fixed mask."""
    results = []
    for impl in ("masked", "gather"):
        moe.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = moe.masked(xi, mask) if impl == "masked" else moe.gathered(xi, mask)
        out.pow(2).sum().backward()
        results.append((out.detach(), xi.grad, moe.w1.grad.clone(), moe.w2.grad.clone(), moe.b1.grad.clone()))
    return results


def edge_case_mask(case: str) -> torch.Tensor:
    """A [3, 5, 6] routing mask: random, or one of the edge cases every execution must handle."""
    mask = torch.rand(3, 5, 6) < 0.4
    if case == "expert_without_tokens":
        mask[..., 2] = False
    if case == "token_with_every_expert":
        mask[1, 3] = True
    if case == "one_each":
        mask = torch.zeros_like(mask).scatter_(-1, torch.randint(0, 6, (3, 5, 1)), True)
    if case == "none":
        mask = torch.zeros_like(mask)
    return mask


@pytest.mark.parametrize("case", ["random", "expert_without_tokens", "token_with_every_expert", "one_each"])
def test_gather_equals_masked(case):
    ffn = random_ffn(d=16, f=48, act=nn.GELU())
    moe, _ = split_ffn(ffn, 6)
    torch.manual_seed(2)
    x = torch.randn(3, 5, 16)
    mask = edge_case_mask(case)
    masked, gathered = gather_vs_masked(moe, x, mask)
    for a, b in zip(masked, gathered):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_gather_runs_only_selected_experts():
    """With impl=gather the forward follows the gate, and unselected experts cost no matmul."""
    from d2dmoe.crossover import set_impl

    ffn = random_ffn()
    moe, _ = split_ffn(ffn, 4)
    set_impl(moe, "gather")
    moe.gate = TopKGate(1)
    x = torch.randn(2, 3, 16)
    calls = []
    moe.act = nn.Sequential()  # identity activation that records the rows it sees
    moe.act.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    out = moe(x)
    assert sum(calls) == 6  # every token's one expert, nothing more
    masked = moe.masked(x, moe.last_mask)
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gated", [False, True])
def test_gather_without_autograd_equals_masked(gated):
    """Inference gather (reused buffers) gives the masked outputs, also when the buffers are reused
    for a larger and then a smaller set of pairs."""
    torch.manual_seed(3)
    up = nn.Linear(16, 48, bias=False) if gated else None
    ffn = FFN(nn.Linear(16, 48), nn.Linear(48, 16), nn.GELU(), up)
    moe, _ = split_ffn(ffn, 6)
    for p in (0.2, 0.7, 0.1):
        x = torch.randn(3, 5, 16)
        mask = torch.rand(3, 5, 6) < p
        mask[0, 0] = False
        mask[0, 0, 1] = True  # every token runs at least one expert
        with torch.no_grad():
            torch.testing.assert_close(moe.gathered(x, mask), moe.masked(x, mask), rtol=1e-5, atol=1e-5)
    from d2dmoe.moe import SCRATCH, free_scratch

    assert {key[0] for key in SCRATCH} >= ({"xs", "h", "y", "up"} if gated else {"xs", "h", "y"})
    free_scratch()
    assert not SCRATCH


def test_gather_scratch_made_under_inference_mode_serves_plain_no_grad():
    """Buffers allocated during an inference-mode evaluation are replaced, not written into, when
    the gather later runs under plain no_grad."""
    from d2dmoe.moe import free_scratch

    torch.manual_seed(4)
    moe, _ = split_ffn(FFN(nn.Linear(16, 48), nn.Linear(48, 16), nn.ReLU()), 6)
    x, mask = torch.randn(2, 5, 16), torch.rand(2, 5, 6) < 0.5
    mask[..., 0] = True
    with torch.inference_mode():
        moe.gathered(x, mask)
    with torch.no_grad():
        torch.testing.assert_close(moe.gathered(x, mask), moe.masked(x, mask), rtol=1e-5, atol=1e-5)
    free_scratch()


def test_masked_inference_leaves_captured_activations_unmasked():
    """Masked execution zeroes h in place only where nothing holds it: activations captured by a hook
    (sparsity statistics) keep every expert's values."""
    from d2dmoe.sparsity import capture_activations

    ffn = random_ffn(act=nn.GELU())
    moe, _ = split_ffn(ffn, 4)
    x = torch.randn(2, 3, 16)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[..., 0] = True
    with torch.inference_mode():
        with capture_activations(moe) as store:
            out = moe.masked(x, mask)
        torch.testing.assert_close(store[0], ffn.act(ffn.w1(x))[..., torch.cat(split_ffn(ffn, 4)[1])])
        torch.testing.assert_close(out, moe.masked(x, mask))  # the in-place path gives the same output


GROUPED_CASES = ("random", "expert_without_tokens", "token_with_every_expert", "one_each", "none")


def check_grouped_equals_masked(device: str = "cpu", dtype: torch.dtype = torch.float32, gateds=(False, True),
                                cases=GROUPED_CASES) -> None:
    """The grouped-GEMM execution (torch._grouped_mm) gives the masked outputs on the edge cases of the
    other executions, and the output bias alone when no expert runs. On a GPU in bfloat16 (what its
    grouped kernel takes), within bfloat16's rounding."""
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for gated in gateds:
        for case in cases:
            torch.manual_seed(4)
            up = nn.Linear(16, 48, bias=False) if gated else None
            moe, _ = split_ffn(FFN(nn.Linear(16, 48), nn.Linear(48, 16), nn.GELU(), up), 6)
            x = torch.randn(3, 5, 16)
            mask = edge_case_mask(case)
            moe, x, mask = moe.to(device, dtype), x.to(device, dtype), mask.to(device)
            with torch.no_grad():
                torch.testing.assert_close(moe.execute(x, mask, "grouped"), moe.masked(x, mask), **tol)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", GROUPED_CASES)
def test_grouped_equals_masked(gated, case):
    check_grouped_equals_masked(gateds=(gated,), cases=(case,))
