"""d2dmoe: convert dense Transformers into dynamic-k Mixture-of-Experts (D2DMoE, NeurIPS 2024)."""
from omegaconf import OmegaConf

from .data import package_dir

# conf/ names installed packages' folders as ${pkgdir:package}, e.g. the bundled MiniLM weights
OmegaConf.register_new_resolver("pkgdir", package_dir, replace=True)

__version__ = "0.1.0"
