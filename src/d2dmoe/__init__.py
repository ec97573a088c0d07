"""d2dmoe: convert dense Transformers into dynamic-k Mixture-of-Experts (D2DMoE, NeurIPS 2024)."""
from omegaconf import OmegaConf

from .data import package_dir

# conf/ names installed packages' folders as ${pkgdir:package}, e.g. the bundled MiniLM weights
OmegaConf.register_new_resolver("pkgdir", package_dir, replace=True)

__version__ = "0.1.0"


def load(path, device="cpu"):
    """A converted model saved by `d2dmoe convert` (or `save_pretrained`), ready to run: see export.py."""
    from .export import load as load_folder

    return load_folder(path, device)
