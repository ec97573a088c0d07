"""Model-family adapters, one per family; `ADAPTERS` maps `model.family` to its adapter."""
from .base import Adapter, Dims
from .bert import BertAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .vit import VitAdapter

ADAPTERS = {a.family: a for a in (BertAdapter, GPT2Adapter, LlamaAdapter, VitAdapter)}

__all__ = ["ADAPTERS", "Adapter", "BertAdapter", "Dims", "GPT2Adapter", "LlamaAdapter", "VitAdapter"]
