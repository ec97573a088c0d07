"""What every adapter shares.

An adapter is the only code that knows a kind of model: it builds the task model (pretrained or
from a config), puts a model-independent `FFN` in place of each block's feed-forward network where
the architecture's layout says (layouts.py), runs the model on a batch, and measures the MAC count
of everything that is not an FFN (measure.py). Everything downstream (sparsify, split, routers,
cost) sees only `FFN`/`MoE`, the adapter and its task.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..attention import Fused, linear_rows
from ..moe import FFN
from ..tasks import Classification
from . import measure
from .layouts import (
    AddResidual,
    Layout,
    Unflatten,
    conv1d_to_linear,
    get,
    layout_for,
    parent_and_name,
    put,
)


@dataclass(frozen=True)
class Dims:
    layers: int
    d: int  # model width
    d_ff: int  # FFN width
    num_labels: int  # outputs of the head: classes, or a language model's vocabulary
    ffn_matrices: int = 2  # weight matrices per FFN: 2 (W1, W2), 3 when gated (gate, up, down)


# config fields that name a model's experts (Mixtral, Qwen2-MoE, DeepSeek, OLMoE, Switch, ...)
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def ffn_runs(adapter, model: nn.Module) -> list[int]:
    """How often one forward of a two-token sample calls each distinct FFN module of the model."""
    ffns = [m for m in model.modules() if isinstance(m, FFN) and m.kind == "ffn"]  # modules() yields each once
    calls = dict.fromkeys(map(id, ffns), 0)

    def count(module, args, output):
        calls[id(module)] += 1

    hooks = [f.register_forward_hook(count) for f in ffns]
    try:
        with torch.no_grad(), torch.device(next(model.parameters()).device):
            adapter.forward(model.eval(), adapter.dummy_batch(2))
    finally:
        for h in hooks:
            h.remove()
    return list(calls.values())


class Adapter:
    """A task's adapter: a transformers text classifier, a transformers causal LM, a timm image
    classifier. Each provides `dims` and `build`, and may override `tokenizer`, `forward`,
    `token_mask`, `dummy_batch`, `patch_grid` and `projection_macs`; the non-FFN cost is measured
    (`fixed_macs`, measure.py). Where a model keeps its FFNs and attention projections is not code
    but its architecture's layout (layouts.py), found from the model's config (`model_type`) or
    given in the model config (`layout`)."""

    family = ""
    task = Classification()
    default_model_type: str | None = None  # the layout of models that carry no config (timm)
    # why attention.convert cannot work for the family, or None when it can
    no_attention_conversion: str | None = None
    # a transformers model: its config.json and tokenizer are saved beside a converted model's
    # weights, and loading reads them from that folder
    config_in_folder = True
    # where weightless copies are built and run (layout checks, cost measurement): the meta device
    # costs no memory or compute; a family whose modules cache tensors made in a forward takes "cpu"
    weightless_device = "meta"

    def __init__(self, name: str, path: str | None = None, family: str | None = None, pretrained: bool = True,
                 config: dict | None = None, attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                 layout: dict | None = None):
        if family is not None and family != self.family:
            raise ValueError(f"model.family={family!r} does not match {type(self).__name__} ({self.family!r})")
        self.name, self.path, self.pretrained = name, path, pretrained
        self.config_overrides = dict(config or {})
        self.attn_implementation = attn_implementation
        # a hub model's own Python code runs only when its config says so (model.trust_remote_code=true)
        self.hub_kwargs = {"trust_remote_code": True} if trust_remote_code else {}
        self.layout_override = dict(layout) if layout else None
        self._cost_fits: dict[Dims, tuple[float, float, float]] = {}

    def attention_for(self, config, auto: str) -> str:
        """The attention implementation to build with: the adapter's, except that a model class
        without torch's scaled_dot_product_attention (Gemma 2) gets the eager one it supports."""
        import transformers

        model_class = getattr(transformers, auto)._model_mapping.get(type(config), None)
        if self.attn_implementation == "sdpa" and model_class is not None and not model_class._supports_sdpa:
            return "eager"
        return self.attn_implementation

    def from_pretrained(self, model_class, cfg, **kwargs) -> nn.Module:
        """A transformers model with every weight from the checkpoint, or an error naming the ones
        missing: a weight of the base model, or of the task head when the folder holds this very
        task model (its head trained). Only a head the folder lacks (a base model given a new task)
        starts fresh, for the dense phase to train. Shapes that differ already stop transformers."""
        model, info = model_class.from_pretrained(self.path, config=cfg, output_loading_info=True, **kwargs,
                                                  **self.hub_kwargs)
        missing = sorted(info.get("missing_keys") or [])
        in_base = [k for k in missing if k.startswith(f"{model.base_model_prefix}.")]
        headed = type(model).__name__ in (cfg.architectures or [])
        if in_base or (headed and missing):
            raise ValueError(f"{self.path}: the checkpoint lacks {len(in_base or missing)} weight(s) of the "
                             f"{'base model' if in_base else 'trained head'} ({type(model).__name__}): "
                             f"{(in_base or missing)[:8]}; they would start random. Save the whole model "
                             "(save_pretrained) and convert that folder")
        return model

    # -- where the FFNs are: the layout ----------------------------------------------------------
    def layout(self, model: nn.Module) -> Layout:
        """The model's layout: the model config's `layout`, else the table's for its model_type."""
        model_type = getattr(getattr(model, "config", None), "model_type", None) or self.default_model_type
        return layout_for(model_type, self.layout_override, f"model class {type(model).__name__}")

    def config_layout(self, config) -> Layout:
        """The layout of a transformers config's model_type (before any model is built); a model
        that is already a Mixture-of-Experts is refused."""
        experts = next(((k, v) for k in MOE_KEYS if (v := getattr(config, k, None))), None)
        if experts:
            raise ValueError(f"model_type {config.model_type!r} is already a Mixture-of-Experts ({experts[0]}="
                             f"{experts[1]}): D2DMoE converts dense FFNs into experts, and its FFNs are not dense")
        return layout_for(config.model_type, self.layout_override, f"model_type {config.model_type!r}")

    def ffn_width(self, config) -> int:
        """d_ff, read from a transformers config where its layout says (unset: 4 x hidden size)."""
        key = self.config_layout(config).d_ff
        return (getattr(config, key, None) if key else None) or 4 * config.hidden_size

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        layout = self.layout(model)
        try:
            return list(get(model, layout.blocks))
        except AttributeError as err:
            raise ValueError(
                f"model class {type(model).__name__}: its layout looks for the blocks in model.{layout.blocks} and "
                f"cannot find them ({err}); give the right paths in the model config's `layout` "
                "(fields: d2dmoe.models.layouts.Layout)") from err

    def make_ffn(self, block: nn.Module, layout: Layout) -> FFN:
        """Put an equivalent `FFN` (the model's own activation) where the layout says, and return it."""
        try:
            w2, act = get(block, layout.w2), get(block, layout.act)
            if layout.gate_up:
                fused = get(block, layout.gate_up)
                half = fused.out_features // 2
                w1, up = (linear_rows(fused.weight, fused.bias, slice(i * half, (i + 1) * half)) for i in (0, 1))
            else:
                w1, up = get(block, layout.w1), (get(block, layout.up) if layout.up else None)
            replaced = get(block, layout.ffn)
            then = [get(replaced, p) for p in layout.then]
        except AttributeError as err:
            raise ValueError(f"block class {type(block).__name__}: the layout's FFN paths do not match it ({err}); "
                             f"looked for {layout}") from err
        if layout.conv1d:
            w1, w2 = conv1d_to_linear(w1), conv1d_to_linear(w2)
        if w1.out_features != w2.in_features:  # e.g. a gated FFN whose first layer holds gate and up
            raise ValueError(f"block class {type(block).__name__}: the layout's w1 has {w1.out_features} outputs but "
                             f"its w2 {w2.in_features} inputs; looked for {layout} (a fused gate/up layer: gate_up)")
        ffn = FFN(w1, w2, act, up=up)
        module = nn.Sequential(ffn, *then) if then else ffn
        if layout.residual:
            replaced = get(block, layout.ffn)  # its dropout, in the mode it is in (a new module would train)
            module = AddResidual(module, getattr(replaced, "hidden_dropout", 0.0)).train(replaced.training)
        if layout.flat:
            module = Unflatten(module)
            block.register_forward_pre_hook(module.capture, with_kwargs=True)
        put(block, layout.ffn, module)
        for path in layout.identity:
            put(block, path, nn.Identity())
        return ffn

    def install_ffns(self, model: nn.Module, activation: nn.Module | None = None) -> nn.Module:
        """Put an `FFN` in each block (blocks that have one keep it). activation=None keeps the
        model's own; otherwise a copy of it goes in every FFN."""
        layout = self.layout(model)
        for block in self.blocks(model):
            ffn = next((m for m in block.modules() if isinstance(m, FFN) and m.kind == "ffn"), None)
            if ffn is None:
                ffn = self.make_ffn(block, layout)
            if activation is not None:
                ffn.act = copy.deepcopy(activation)
        return model

    def check_layout(self, num_labels: int | None, attention: bool = False) -> None:
        """Place every FFN (and find the attention projections, with `attention`) in a weightless copy
        (weightless_device): a layout that does not fit the model stops here, before any training."""
        with torch.random.fork_rng(devices=[]), torch.device(self.weightless_device):
            model = self.install_ffns(self.build(num_labels, weights=False))
            if attention:
                self.projection_slots(model)
        self.check_each_ffn_runs_once(model, num_labels)

    def check_each_ffn_runs_once(self, model: nn.Module, num_labels: int | None) -> None:
        """One forward of a short sample, counting the calls of every placed FFN: a model whose layers
        share weights (ALBERT runs one layer 12 times) would have its converted cost counted once per
        FFN module, so it stops here; so does a layout whose blocks are not what the forward runs."""
        try:
            runs = ffn_runs(self, model)
        except (RuntimeError, NotImplementedError, ValueError, TypeError):  # a forward that reads values
            with torch.random.fork_rng(devices=[]):
                runs = ffn_runs(self, self.install_ffns(self.build(num_labels, weights=False)))
        blocks = len(self.blocks(model))
        if len(runs) != blocks or set(runs) != {1}:
            raise ValueError(f"model class {type(model).__name__}: its {blocks} blocks hold {len(runs)} distinct FFNs, "
                             f"which one forward runs {runs} times: layers that share weights (as ALBERT's do) "
                             "cannot be converted with their cost counted right, and are not supported")

    def ffn_slots(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of each block's FFN, for swapping it for an MoE."""
        layout = self.layout(model)
        slots = []
        for block in self.blocks(model):
            parent, name = parent_and_name(block, layout.ffn)
            if layout.flat or layout.residual:
                parent, name = getattr(parent, name), "inner"
            if layout.then:
                parent, name = getattr(parent, name), "0"
            slots.append((parent, name))
        return slots

    def projection_slots(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of every attention projection Q, K, V, O (each a d -> d Linear, or
        what replaced it), block by block; a fused QKV layer is first cut into its parts (Fused)."""
        layout = self.layout(model)
        if layout.projections is None or self.no_attention_conversion:
            raise NotImplementedError(f"attention.convert is not supported for {type(model).__name__}: "
                                      f"{self.no_attention_conversion or 'its layout names no d -> d projections'}")
        slots = []
        for block in self.blocks(model):
            if layout.qkv:
                qkv = get(block, layout.qkv)
                if not isinstance(qkv, Fused):
                    qkv = Fused.from_linear(conv1d_to_linear(qkv) if layout.conv1d else qkv, 3)
                    put(block, layout.qkv, qkv)
                slots += qkv.slots()
            for path in layout.projections:
                if layout.conv1d and type(get(block, path)).__name__ == "Conv1D":
                    put(block, path, conv1d_to_linear(get(block, path)))
                slots.append(parent_and_name(block, path))
        return slots

    # -- cost ------------------------------------------------------------------------------------
    fixed_tokens: int | None = None  # models whose every sample has the same token count (images)

    def dummy_batch(self, tokens: int) -> dict:
        """One sample of `tokens` real tokens, for measuring the cost (measure.py)."""
        ids = torch.full((1, tokens), 3, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def fixed_macs(self, tokens: torch.Tensor, dims: Dims) -> torch.Tensor:
        """MACs of everything except the FFNs, per sample with `tokens` real tokens ([B] -> [B]):
        a0 + a1 T + a2 T^2, measured once per shape with FlopCounterMode (measure.py)."""
        if dims not in self._cost_fits:
            self._cost_fits[dims] = tuple(float(a) for a in measure.fit(self, dims))
        a0, a1, a2 = self._cost_fits[dims]
        t = tokens.double()
        return a0 + a1 * t + a2 * t**2

    def projection_macs(self, tokens: torch.Tensor, dims: Dims) -> torch.Tensor:
        """The part of `fixed_macs` that the attention projections make up ([B] -> [B])."""
        return dims.layers * 4 * tokens.double() * dims.d**2

    def tokenizer(self, data=None):
        """The tokenizer the data is encoded with; None for models that take no text."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path, **self.hub_kwargs)

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The model's logits on a batch: [B, C] for classifiers, [B, T, V] for language models."""
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def token_mask(self, batch: dict) -> torch.Tensor:
        """[B, T] mask of the real tokens the FFNs see (1 = real, 0 = padding)."""
        return batch["attention_mask"]

    @property
    def patch_grid(self) -> tuple[int, int, int] | None:
        """(prefix tokens, grid height, grid width) when tokens are image patches, else None."""
        return None
