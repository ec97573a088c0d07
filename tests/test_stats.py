"""Recorded statistics: activation sparsity, executed experts per token and per image patch."""
import numpy as np
import pytest
import torch
from torch import nn

from d2dmoe import pipeline
from d2dmoe.moe import moe_layers
from d2dmoe.results import read_stats, write_stats
from d2dmoe.stats import NONZERO_BINS, ActivationStats, ExpertUse

from .conftest import compose_config


def test_activation_stats_count_zeros_on_real_tokens_only():
    # layer 0: tokens with 3/4, 1/4 zeros and a padding token (all zeros) that must not count
    a = torch.tensor([[[0.0, 0, 0, 1], [1, 2, 0, 3], [0, 0, 0, 0]]])
    stats = ActivationStats()
    stats.update([a, a.abs() + 1], torch.tensor([[1, 1, 0]]))
    first, second = stats.result()
    assert first["zero_fraction"] == pytest.approx(0.5)
    assert first["zero_fraction_std"] == pytest.approx(0.25)
    assert second["zero_fraction"] == 0.0 and second["zero_fraction_std"] == 0.0
    hist = np.array(first["nonzero_fraction_hist"])
    assert hist.sum() == 2 and len(hist) == NONZERO_BINS
    assert hist[int(0.25 * NONZERO_BINS)] == 1 and hist[int(0.75 * NONZERO_BINS)] == 1
    assert second["nonzero_fraction_hist"][-1] == 2  # fully dense tokens land in the last bin


def test_expert_use_histograms_and_patch_maps():
    # 2 layers, 2 images of 1 prefix token + a 2x2 patch grid, 3 experts
    masks = [torch.zeros(2, 5, 3, dtype=torch.bool), torch.zeros(2, 5, 3, dtype=torch.bool)]
    masks[0][..., 0] = True  # layer 0: one expert everywhere
    masks[1][..., :2] = True  # layer 1: two experts everywhere...
    masks[1][1, 4] = True  # ...except image 1's last patch: three
    use = ExpertUse(patch_grid=(1, 2, 2), keep=1)
    pixels = torch.randn(2, 1, 4, 4)
    use.update(masks, torch.ones(2, 5), pixels)
    result = use.result()
    assert [layer["experts_hist"] for layer in result["layers"]] == [[0, 10, 0, 0], [0, 0, 9, 1]]
    assert result["layers"][1]["experts_per_token"] == pytest.approx(2.1)
    # mean over layers, then over the 2 images: 1.5 everywhere, (1.5 + 2) / 2 at the last patch
    assert result["patch_experts"] == [[1.5, 1.5], [1.5, 1.75]]
    assert len(use.maps) == 1 and torch.equal(use.pixels[0], pixels[0])  # only `keep` images kept
    assert use.maps[0].tolist() == [[1.5, 1.5], [1.5, 1.5]]


def test_vit_run_writes_patch_maps(tmp_path):
    cfg = compose_config(["experiment=smoke", "model=tiny_vit", "data=digits", "~data.max_length"],
                         artifacts_dir=tmp_path / "artifacts")
    results = pipeline.run(cfg)
    write_stats(results, tmp_path)
    stats = read_stats(tmp_path)
    assert len(stats["activation"]) == 2 and len(stats["points"]) == 3  # tiny ViT depth, three taus
    grid = np.array(stats["points"][0]["patch_experts"])
    assert grid.shape == (4, 4) and np.allclose(grid, 8)  # digits 8x8, patch 2: tau=0 runs all 8 experts
    saved = np.load(tmp_path / "patch_maps.npz")
    assert saved["images"].shape == (8, 1, 8, 8)
    assert saved["maps"].shape == (3, 8, 4, 4)
    assert saved["taus"].tolist() == [0.0, 0.5, 1.0]
    assert np.allclose(saved["maps"][-1], 1.0)  # tau=1: one expert per patch


def test_keeping_the_models_activation_converts_with_it(tmp_path):
    cfg = compose_config(["experiment=smoke", "sparsity.activation=keep"], artifacts_dir=tmp_path)
    ctx, dense, moe = pipeline.convert(cfg)
    acts = {type(m.act) for m in moe_layers(moe)}
    assert len(acts) == 1 and acts.pop() is not nn.ReLU  # tiny BERT's own GELU
    assert all(isinstance(m.act, nn.ReLU) for m in moe_layers(pipeline.convert(
        compose_config(["experiment=smoke"], artifacts_dir=tmp_path))[2]))
