"""ViT through timm and the image data: equivalence after conversion, cost against FlopCounterMode,
the whole pipeline on digits, and the idx reader against files written by hand."""
import copy
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from d2dmoe import pipeline
from d2dmoe.cost import dense_macs, moe_model_macs
from d2dmoe.image_data import ImageClassificationData, read_idx
from d2dmoe.models import VitAdapter
from d2dmoe.moe import ffn_layers, moe_layers
from d2dmoe.phases.split import split_model
from tests.conftest import compose_config

CONFIG = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2,
          "mlp_ratio": 2}


def tiny(attn="eager"):
    return VitAdapter("tiny_vit", path="vit_tiny_patch16_224", pretrained=False, config=CONFIG,
                      attn_implementation=attn)


def images(n=3):
    torch.manual_seed(0)
    return {"pixel_values": torch.randn(n, 1, 8, 8), "labels": torch.arange(n)}


def test_all_experts_equal_the_original_vit():
    adapter = tiny(attn="sdpa")
    original = adapter.build(10).eval()
    batch = images()
    with torch.no_grad():
        reference = adapter.forward(original, batch)
        converted = adapter.install_ffns(copy.deepcopy(original))
        torch.testing.assert_close(adapter.forward(converted, batch), reference, rtol=1e-5, atol=1e-6)
        split_model(adapter, converted, num_experts=8, router_hidden=16, n_init=1)
        assert len(moe_layers(converted)) == 2 and not ffn_layers(converted)
        torch.testing.assert_close(adapter.forward(converted, batch), reference, rtol=1e-5, atol=1e-6)


def test_vit_tokens_and_dims():
    adapter = tiny()
    d = adapter.dims(10)
    assert (d.layers, d.d, d.d_ff) == (2, 32, 64)
    assert adapter.token_mask(images(4)).shape == (4, 16 + 1)  # 4x4 patches and the class token


def counted_macs(adapter, model, batch) -> float:
    with FlopCounterMode(display=False) as counter:
        adapter.forward(model, batch)
    return counter.get_total_flops() / 2


def test_dense_and_moe_macs_match_flop_counter():
    adapter = tiny()
    model = adapter.build(10).eval()
    batch = images(1)
    tokens = adapter.token_mask(batch).sum(-1)
    assert dense_macs(adapter, tokens, adapter.dims(10)).item() == pytest.approx(
        counted_macs(adapter, model, batch), rel=1e-9)
    adapter.install_ffns(model, nn.ReLU())
    split_model(adapter, model, num_experts=8, router_hidden=16, n_init=1)
    counted = counted_macs(adapter, model, batch)  # the forward also records the gate masks
    analytic = moe_model_macs(adapter, model, adapter.token_mask(batch), adapter.dims(10))
    assert analytic.item() == pytest.approx(counted, rel=1e-9)


def test_vit_pipeline_on_digits(tmp_path):
    cfg = compose_config(["experiment=smoke", "model=tiny_vit", "data=digits", "~data.max_length"],
                         artifacts_dir=tmp_path)  # images have no max_length
    points = pipeline.run(cfg).points
    assert [p["method"] for p in points] == ["dense"] + ["d2dmoe"] * 3
    assert all(p["metric"] == "accuracy" and 0 <= p["value"] <= 1 for p in points)
    assert points[1]["experts_per_token"] == 8
    costs = [p["rel_cost"] for p in points[1:]]
    assert costs == sorted(costs, reverse=True)
    again = pipeline.run(cfg).points  # every phase loaded back from its artifact into a fresh model
    assert [(p["value"], p["macs"]) for p in again] == [(p["value"], p["macs"]) for p in points]


def write_idx(path, array: np.ndarray):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_read_back_and_split(tmp_path):
    rng = np.random.default_rng(0)
    train_x, train_y = rng.integers(0, 256, (50, 6, 6)), rng.integers(0, 3, 50)
    test_x, test_y = rng.integers(0, 256, (20, 6, 6)), rng.integers(0, 3, 20)
    for prefix, x, y in (("train", train_x, train_y), ("t10k", test_x, test_y)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", y)
    assert (read_idx(tmp_path / "train-images-idx3-ubyte.gz") == train_x).all()
    data = ImageClassificationData("toy", "idx", str(tmp_path), mean=[0.0], std=[1.0], val_fraction=0.2)
    data.setup()
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [40, 10, 20]
    first = data.splits["test"][0]
    assert first["pixel_values"].shape == (1, 6, 6) and first["labels"] == test_y[0]
    torch.testing.assert_close(first["pixel_values"][0], torch.tensor(test_x[0] / 255, dtype=torch.float32))
    batch = next(iter(data.train_dataloader()))
    assert batch["pixel_values"].shape == (40, 1, 6, 6) and batch["labels"].shape == (40,)


FASHION = Path("/usr/share/datasets/fashion-mnist")


# a Debian package (.ci/run installs it), not something `pip install -e ".[test]"` provides
@pytest.mark.skipif(not FASHION.is_dir(), reason=f"{FASHION} not present (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_debian():
    """The vit_fashion data as installed by .ci/run (apt-get install dataset-fashion-mnist)."""
    data = ImageClassificationData("fashion_mnist", "idx", str(FASHION))
    data.setup()
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [54000, 6000, 10000]
    assert data.num_labels == 10
    assert data.splits["train"][0]["pixel_values"].shape == (1, 28, 28)


def test_image_folder_and_local_vit_weights(tmp_path):
    """The vit_imagenet path: an ImageFolder (train/, val/) and timm weights from a local file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    data = ImageClassificationData("folder", "image_folder", str(tmp_path), image_size=8, mean=[0.5] * 3,
                                   std=[0.5] * 3, val_fraction=0.25)
    data.setup()
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [9, 3, 4]
    assert data.num_labels == 2 and data.splits["test"][0]["pixel_values"].shape == (3, 8, 8)

    config = dict(CONFIG, in_chans=3)
    source = VitAdapter("v", path="vit_tiny_patch16_224", pretrained=False, config=config).build(2)
    with torch.no_grad():  # unlike any fresh (seeded) initialisation
        for p in source.parameters():
            p.add_(torch.rand_like(p))
    weights = tmp_path / "vit.pth"
    torch.save(source.state_dict(), weights)
    loaded = VitAdapter("v", path="vit_tiny_patch16_224", pretrained=True, config=config,
                        weights_file=str(weights)).build(2)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        if not name.startswith("head."):  # timm starts a fresh head when the class count differs from 1000
            torch.testing.assert_close(a, b, msg=name)


def timm_folder(root, num_classes: int, model_args: dict):
    """A fine-tuned timm model in timm's hub format: config.json (architecture, num_classes,
    model_args) and model.safetensors, every weight unlike a fresh initialisation."""
    import json

    from safetensors.torch import save_file

    source = VitAdapter("v", path="vit_tiny_patch16_224", pretrained=False, config=model_args).build(num_classes)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.rand_like(p))
    root.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": num_classes,
                                                  "model_args": model_args}))
    return source


def test_a_timm_folder_keeps_its_architecture_and_trained_head_or_says_why_not(tmp_path):
    """model=auto on a fine-tuned timm folder: its model_args shape the model and every weight, the
    3-class head included, loads exactly; data with another class count stops naming the head."""
    from d2dmoe.models import auto

    model_args = dict(CONFIG, in_chans=3)
    source = timm_folder(tmp_path / "mine", 3, model_args)
    adapter = auto("mine", path=str(tmp_path / "mine"))
    loaded = adapter.build(3)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match=r"head\.weight.*trained head with another class count"):
        adapter.build(10)


@pytest.mark.parametrize("mlp_layer, message", [
    ("SwiGLU", r"SwiGLU in Block: only timm's Mlp \(fc1, act, fc2\) and GluMlp"),  # fc1_g, fc1_x: not a layout
    ("GluMlp", r"GluMlp in Block activates the second half of fc1"),  # timm's default gate_last (EVA-02's is not)
])
def test_a_gated_timm_mlp_that_cannot_convert_is_refused_naming_it(mlp_layer, message):
    import timm.layers

    adapter = VitAdapter("v", path="vit_tiny_patch16_224", pretrained=False,
                         config=dict(CONFIG, mlp_layer=getattr(timm.layers, mlp_layer)))
    with pytest.raises(ValueError, match=message):
        adapter.check_layout(3)
