"""Task adapters; `ADAPTERS` maps `model.family` to its adapter. Where each architecture keeps its
FFNs is in layouts.py, not in the adapters."""
from .base import Adapter, Dims
from .bert import BertAdapter
from .causal_lm import CausalLMAdapter
from .detect import auto
from .gpt2 import GPT2Adapter
from .image import ImageClassifierAdapter
from .llama import LlamaAdapter
from .vit import VitAdapter

ADAPTERS = {a.family: a for a in (BertAdapter, CausalLMAdapter, GPT2Adapter, LlamaAdapter, VitAdapter,
                                  ImageClassifierAdapter)}

__all__ = ["ADAPTERS", "Adapter", "BertAdapter", "CausalLMAdapter", "Dims", "GPT2Adapter", "ImageClassifierAdapter", "LlamaAdapter",
           "VitAdapter", "auto"]
