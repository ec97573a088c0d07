"""The official D2DMoE kernels (experiments/peer.py) give our masked outputs, so that timing them beside
ours compares the same computation. Needs a checkout of github.com/bartwojcik/D2DMoE: set D2DMOE_PEER to
its path (the test skips without one; CI has none). Without a GPU, the kernels run in Triton's CPU
interpreter, which must be set before triton is imported: hence a subprocess running this file."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from d2dmoe.moe import FFN, MoE, Router

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT = os.environ.get("D2DMOE_PEER")


def check_peer_equals_masked(checkout: str, device: str = "cpu") -> None:
    from experiments import peer

    impls = peer.load(checkout)
    # the interpreter runs each config it tunes; on a GPU each is compiled first (about 100 per kernel)
    peer.limit_configs(impls, 1 if device == "cpu" else 4)
    torch.manual_seed(0)
    for act in (nn.ReLU(), nn.GELU()):
        moe = MoE.from_ffn(FFN(nn.Linear(32, 128), nn.Linear(128, 32), act), list(torch.arange(128).chunk(8)),
                           Router(32, 8)).to(device)
        x = torch.randn(40, 32, device=device)
        masks = [torch.rand(40, 8, device=device) < 0.3, torch.zeros(40, 8, dtype=torch.bool, device=device)]
        masks[1][:, 3] = True  # every token on one expert, the others on none
        with torch.no_grad():
            for mask in masks:
                for variant in peer.VARIANTS:
                    out = peer.PeerExperts(impls, moe, variant)(x, mask)
                    torch.testing.assert_close(out, moe.masked(x, mask), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CHECKOUT, reason="set D2DMOE_PEER to a D2DMoE checkout")
def test_peer_kernels_equal_masked_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    run = subprocess.run([sys.executable, "-m", "tests.test_peer"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_folder_that_is_not_a_checkout_is_named(tmp_path):
    from experiments import peer

    with pytest.raises(FileNotFoundError, match="not a D2DMoE checkout"):
        peer.load(tmp_path)


def test_the_peer_has_no_gated_experts():
    from experiments import peer

    moe = MoE.from_ffn(FFN(nn.Linear(8, 16), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 16, bias=False)),
                       list(torch.arange(16).chunk(2)), Router(8, 2))
    with pytest.raises(ValueError, match="gated"):
        peer.PeerExperts(None, moe)


if __name__ == "__main__":
    check_peer_equals_masked(CHECKOUT)
    print("peer kernels == masked")
