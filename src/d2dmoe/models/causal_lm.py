"""What decoder-only language models share: tokenizer, building, dims, the LM head's cost."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..tasks import LanguageModeling
from .base import Adapter, Dims


class CausalLMAdapter(Adapter):
    """A transformers causal LM (`AutoModelForCausalLM`), from hub/local weights or from a config.

    tokenizer: None to load the tokenizer from `path`; or {vocab_size: N} to train a byte-level BPE
    offline on the data's training texts (for models trained from a config).
    gguf_file: a GGUF file inside `path` to load weights and tokenizer from (dequantised to float32).
    """

    family = "causal_lm"
    task = LanguageModeling()
    config_class = ""  # transformers config class for models built from a config

    def __init__(self, *args, tokenizer: dict | None = None, gguf_file: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer_spec = dict(tokenizer) if tokenizer else None
        self.gguf_file = gguf_file
        self.vocab_size: int | None = None  # known once the tokenizer is
        self.eos_id: int | None = None
        self._config = None  # read once (a GGUF file takes seconds to parse), again after the tokenizer

    def tokenizer(self, data=None):
        if self.tokenizer_spec is not None:
            from ..tokenizer import train_bpe

            tok = train_bpe(data.train_texts(), data.cache_dir, **self.tokenizer_spec)
        else:
            from transformers import AutoTokenizer

            kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
            tok = AutoTokenizer.from_pretrained(self.path, **kwargs, **self.hub_kwargs)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token  # padding is masked out of the loss and the cost anyway
        self.vocab_size, self.eos_id = len(tok), tok.eos_token_id
        self._config = None
        return tok

    def hf_config(self):
        if self._config is None:
            self._config = self.read_config()
        return self._config

    def read_config(self):
        import transformers
        from transformers import AutoConfig

        overrides = dict(self.config_overrides)
        if self.vocab_size is not None and self.tokenizer_spec is not None:
            # a trained tokenizer sets the embedding size and the special token
            overrides.update(vocab_size=self.vocab_size, bos_token_id=self.eos_id, eos_token_id=self.eos_id)
        if self.path is None:
            cfg = getattr(transformers, self.config_class)(**overrides)
        else:
            kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
            cfg = AutoConfig.from_pretrained(self.path, **kwargs, **self.hub_kwargs, **overrides)
        cfg._attn_implementation = self.attention_for(cfg, "AutoModelForCausalLM")
        return cfg

    def dims(self, num_labels: int | None = None) -> Dims:
        """num_labels is ignored: a language model's head outputs the vocabulary."""
        c = self.hf_config()
        matrices = 3 if self.config_layout(c).gated else 2
        return Dims(c.num_hidden_layers, c.hidden_size, self.ffn_width(c), c.vocab_size, matrices)

    def build(self, num_labels: int | None = None, weights: bool = True) -> nn.Module:
        from transformers import AutoModelForCausalLM

        cfg = copy.deepcopy(self.hf_config())  # each model owns its config
        torch.manual_seed(0)  # a model built from a config starts the same every time
        if self.pretrained and weights:
            kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
            model = self.from_pretrained(AutoModelForCausalLM, cfg, **kwargs)
            if self.gguf_file:  # GGUF weights arrive dequantised to float32: a plain model from here on
                model.hf_quantizer, model.is_quantized = None, False
                model.config.__dict__.pop("quantization_config", None)
            return model
        return AutoModelForCausalLM.from_config(cfg)

    def attention_widths(self, c) -> tuple[int, int]:
        """(query width, key/value width): they differ under grouped-query attention."""
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return heads * head_dim, getattr(c, "num_key_value_heads", heads) * head_dim

    def attention_macs(self, t: torch.Tensor, c) -> torch.Tensor:
        """Per layer, for T tokens: Q, K, V, O projections and the attention scores and mixing. The
        scores and mixing are counted over the full T x T matrix, as the kernels compute them."""
        q, kv = self.attention_widths(c)
        return t * c.hidden_size * (2 * q + 2 * kv) + 2 * t**2 * q

    def projection_macs(self, tokens: torch.Tensor, dims: Dims) -> torch.Tensor:
        q, kv = self.attention_widths(self.hf_config())
        return dims.layers * tokens.double() * dims.d * (2 * q + 2 * kv)

    def analytic_fixed_macs(self, tokens: torch.Tensor, dims: Dims) -> torch.Tensor:
        """MACs of everything except the FFNs, per sequence with `tokens` real tokens ([B] -> [B]):
        attention in every layer, then the LM head (d x V per token). Embeddings and norms: no MACs."""
        t = tokens.double()
        return dims.layers * self.attention_macs(t, self.hf_config()) + t * dims.d * dims.num_labels
