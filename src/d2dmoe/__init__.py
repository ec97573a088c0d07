"""d2dmoe: convert dense Transformers into dynamic-k Mixture-of-Experts (D2DMoE, NeurIPS 2024)."""
from omegaconf import OmegaConf

from .data import package_dir

# conf/ names installed packages' folders as ${pkgdir:package}, e.g. the bundled MiniLM weights
OmegaConf.register_new_resolver("pkgdir", package_dir, replace=True)

__version__ = "0.1.0"

# transformers' Auto classes load converted folders (auto.py)
from .auto import register as _register_auto  # noqa: E402

_register_auto()


def load(path, device="cpu", trust_remote_code=False):
    """A converted model saved by `d2dmoe convert` (or `save_pretrained`), ready to run: its own class
    (a transformers or timm model) with the operating point to set; see export.py."""
    from .export import load as load_folder

    return load_folder(path, device, trust_remote_code)


def convert(model, train_data, val_data, test_data=None, **settings):
    """A transformers model converted on data in memory, its operating point chosen on validation
    within `budget`: returns the converted model, its points and spec (api.convert says more)."""
    from .api import convert as convert_in_memory

    return convert_in_memory(model, train_data, val_data, test_data, **settings)
