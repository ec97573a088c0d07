"""Where each architecture keeps its feed-forward networks, as data.

An adapter (one per task: a transformers text classifier, a transformers causal LM, a timm image
classifier) finds a model's blocks, FFNs and attention projections through its architecture's
`Layout`, looked up in `LAYOUTS` by the model config's `model_type` (timm models: "timm_vit"). A
layout the table lacks goes in the model config instead, with the same fields:

    model.layout: {blocks: transformer.layers, ffn: mlp, w1: mlp.fc_in, w2: mlp.fc_out, act: mlp.act}

Paths are attribute paths (`a.b.0.c`): `blocks` from the task model, the others from one block.
The FFN (moe.FFN) takes the place of the module at `ffn`; for the model to compute what it did, that
module's forward must be w2(act(w1 x)) (gated: w2(act(w1 x) * up(x))), followed by the modules
named in `then` (a dropout), and the modules in `identity`, outside it, must be the FFN's own layers
that the model calls separately (BERT applies its `output.dense` outside `intermediate`).
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from operator import attrgetter

from torch import nn


@dataclass(frozen=True)
class Layout:
    blocks: str  # the list of transformer blocks, from the task model
    ffn: str  # in a block: the module the FFN takes the place of
    w2: str  # the output projection
    act: str  # the activation module between the projections
    w1: str | None = None  # the first projection (the gate projection when gated)
    up: str | None = None  # a gated FFN's up projection
    gate_up: str | None = None  # instead of w1 and up: a fused [gate; up] projection (gate rows first)
    then: tuple[str, ...] = ()  # modules of the replaced `ffn` that still run after the FFN, in order
    identity: tuple[str, ...] = ()  # modules outside `ffn` that the FFN now computes: they become nn.Identity
    d_ff: str | None = "intermediate_size"  # the config attribute holding the FFN width (unset: 4 x hidden size)
    # attention.convert: the Q, K, V and O projections (each d -> d) in a block; with `qkv`, a fused
    # Q, K, V projection (d -> 3d) cut into three, `projections` then holds O only. None: not supported
    projections: tuple[str, ...] | None = None
    qkv: str | None = None
    conv1d: bool = False  # weights kept as transformers' Conv1D ([in, out]): they become nn.Linear
    flat: bool = False  # the block flattens its tokens to [B*T, d] before the FFN (OPT): see Unflatten
    residual: bool = False  # `ffn` takes (x, residual) and adds the residual itself (BLOOM): see AddResidual

    def __post_init__(self):
        if (self.w1 is None) == (self.gate_up is None):
            raise ValueError(f"a layout names the first FFN projection as w1 or, fused with up, as gate_up "
                             f"(exactly one); got w1={self.w1!r}, gate_up={self.gate_up!r}")

    @property
    def gated(self) -> bool:
        return self.up is not None or self.gate_up is not None

    @classmethod
    def from_config(cls, spec: dict) -> Layout:
        """A layout from a model config's `layout` entry (lists become tuples)."""
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(spec) - known):
            raise ValueError(f"model.layout: unknown field(s) {unknown}; a layout has {sorted(known)}")
        if missing := [f.name for f in fields(cls) if f.default is MISSING and f.name not in spec]:
            raise ValueError(f"model.layout: missing field(s) {missing}")
        return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in spec.items()})

# BERT's FFN: `intermediate` (dense, act), then `output.dense` inside BertOutput (with the residual)
_BERT = {"ffn": "intermediate", "w1": "intermediate.dense", "w2": "output.dense", "act": "intermediate.intermediate_act_fn",
         "identity": ("output.dense",), "projections": ("attention.self.query", "attention.self.key",
                                                        "attention.self.value", "attention.output.dense")}
# the Llama layout: mlp = down(act(gate(x)) * up(x)); grouped-query K/V are not d -> d
_LLAMA = {"blocks": "model.layers", "ffn": "mlp", "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "act": "mlp.act_fn",
          "up": "mlp.up_proj"}

# transformers' ViT family: mlp = fc2(act(fc1(x))), attention with separate q, k, v, o projections
_VISION = {"ffn": "mlp", "w1": "mlp.fc1", "w2": "mlp.fc2", "act": "mlp.activation_fn",
           "projections": ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")}

LAYOUTS: dict[str, Layout] = {
    "bert": Layout(blocks="bert.encoder.layer", **_BERT),
    "roberta": Layout(blocks="roberta.encoder.layer", **_BERT),
    "xlm-roberta": Layout(blocks="roberta.encoder.layer", **_BERT),
    "electra": Layout(blocks="electra.encoder.layer", **_BERT),
    "roformer": Layout(blocks="roformer.encoder.layer", **_BERT),
    "mpnet": Layout(blocks="mpnet.encoder.layer", **{**_BERT, "projections": None}),  # its attention: q, k, v, o
    # DeBERTa-v2/v3: BERT's FFN; its disentangled relative attention is left as it is
    "deberta-v2": Layout(blocks="deberta.encoder.layer", **{**_BERT, "projections": None}),
    # ModernBERT: Wo(drop(act(input) * gate)) with [input; gate] = Wi(x), the activated half first
    "modernbert": Layout(blocks="model.layers", ffn="mlp", gate_up="mlp.Wi", w2="mlp.Wo", act="mlp.act",
                         then=()),
    "distilbert": Layout(blocks="distilbert.transformer.layer", ffn="ffn", w1="ffn.lin1", w2="ffn.lin2",
                         act="ffn.activation", then=("dropout",), d_ff="hidden_dim",
                         projections=("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin")),
    "gpt2": Layout(blocks="transformer.h", ffn="mlp", w1="mlp.c_fc", w2="mlp.c_proj", act="mlp.act",
                   then=("dropout",), d_ff="n_inner", qkv="attn.c_attn", projections=("attn.c_proj",), conv1d=True),
    "gpt_neox": Layout(blocks="gpt_neox.layers", ffn="mlp", w1="mlp.dense_h_to_4h", w2="mlp.dense_4h_to_h",
                       act="mlp.act", qkv="attention.query_key_value", projections=("attention.dense",)),
    "gptj": Layout(blocks="transformer.h", ffn="mlp", w1="mlp.fc_in", w2="mlp.fc_out", act="mlp.act",
                   then=("dropout",), d_ff="n_inner"),
    "gpt_bigcode": Layout(blocks="transformer.h", ffn="mlp", w1="mlp.c_fc", w2="mlp.c_proj", act="mlp.act",
                          then=("dropout",), d_ff="n_inner"),
    # StarCoder2's mlp ends in a functional dropout (residual_dropout, 0 unless set), which the FFN leaves out
    "starcoder2": Layout(blocks="model.layers", ffn="mlp", w1="mlp.c_fc", w2="mlp.c_proj", act="mlp.act"),
    "falcon": Layout(blocks="transformer.h", ffn="mlp", w1="mlp.dense_h_to_4h", w2="mlp.dense_4h_to_h",
                     act="mlp.act", d_ff="ffn_hidden_size"),
    "phi": Layout(blocks="model.layers", ffn="mlp", w1="mlp.fc1", w2="mlp.fc2", act="mlp.activation_fn"),
    "llama": Layout(**_LLAMA),
    "olmo": Layout(**_LLAMA),
    "olmo2": Layout(**_LLAMA),
    "cohere": Layout(**_LLAMA),  # attention and FFN side by side in each block: the FFN is still `mlp`
    "stablelm": Layout(**_LLAMA),
    "granite": Layout(**_LLAMA),
    "mistral": Layout(**_LLAMA),
    "qwen2": Layout(**_LLAMA),
    "qwen3": Layout(**_LLAMA),
    "gemma": Layout(**_LLAMA),
    "gemma2": Layout(**_LLAMA),
    "gemma3_text": Layout(**_LLAMA),
    "phi3": Layout(blocks="model.layers", ffn="mlp", gate_up="mlp.gate_up_proj",
                   w2="mlp.down_proj", act="mlp.activation_fn"),
    # OPT calls fc1, the activation and fc2 one by one, on tokens flattened to [B*T, d]
    "opt": Layout(blocks="model.decoder.layers", ffn="fc1", w1="fc1", w2="fc2", act="activation_fn",
                  identity=("activation_fn", "fc2"), d_ff="ffn_dim", flat=True,
                  projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")),
    # BLOOM's mlp adds the residual itself; its fused QKV interleaves the heads, so no projections
    "bloom": Layout(blocks="transformer.h", ffn="mlp", w1="mlp.dense_h_to_4h", w2="mlp.dense_4h_to_h",
                    act="mlp.gelu_impl", d_ff=None, residual=True),
    # transformers' vision encoders (models/image.py)
    "vit": Layout(blocks="vit.layers", **_VISION),
    "deit": Layout(blocks="deit.layers", **_VISION),
    "beit": Layout(blocks="beit.layers", **_VISION),
    "dinov2": Layout(blocks="dinov2.encoder.layer", **{**_VISION, "d_ff": None}),  # width: hidden x mlp_ratio
    # timm's GluMlp (EVA-02): fc2(act(gate) * up) with [gate; up] = fc1(x)
    "timm_glu": Layout(blocks="blocks", ffn="mlp", gate_up="mlp.fc1", w2="mlp.fc2", act="mlp.act", d_ff=None),
    "timm_vit": Layout(blocks="blocks", ffn="mlp", w1="mlp.fc1", w2="mlp.fc2", act="mlp.act", d_ff=None,
                       qkv="attn.qkv", projections=("attn.proj",)),
}


class Unflatten(nn.Module):
    """For blocks that flatten their tokens to [B*T, d] before the FFN (Layout.flat): the FFN inside
    sees [B, T, d], the shape every token mask and cost is per token of, and the block gets [B*T, d]
    back. The shape comes from the block's input, read by `capture`, its forward pre-hook."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.shape: tuple[int, ...] | None = None

    def capture(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, d]
        self.shape = tuple(hidden.shape[:-1])

    def forward(self, x):  # [B*T, d] -> [B*T, d]
        return self.inner(x.view(*self.shape, x.shape[-1])).reshape(x.shape)


class AddResidual(nn.Module):
    """For an FFN module that adds the residual itself (Layout.residual): the FFN inside, then the
    module's dropout and the residual, as `dropout_add` did."""

    def __init__(self, inner: nn.Module, dropout: float):
        super().__init__()
        self.inner, self.dropout = inner, float(dropout)

    def forward(self, x, residual):  # [B, T, d] twice -> [B, T, d]
        return residual + nn.functional.dropout(self.inner(x), self.dropout, self.training)


# architectures that cannot convert right whatever the layout, and why
REFUSED = {"albert": "ALBERT runs one layer's weights at every depth: its FFN would be one module run 12 times, and "
                     "the converted cost would be counted once; models whose layers share weights are not supported"}


def layout_for(model_type: str, override: dict | None, what: str) -> Layout:
    """The layout of `model_type` (the model config's `override` first). `what` names the model
    for the error when there is none."""
    if override:  # a layout for a refused architecture still meets the checks that refuse it (check_layout)
        return Layout.from_config(dict(override))
    if model_type in REFUSED:
        raise ValueError(f"{what}: {REFUSED[model_type]}")
    if model_type not in LAYOUTS:
        raise ValueError(
            f"{what}: no FFN layout for model_type {model_type!r}; layouts exist for {sorted(LAYOUTS)}. Give one "
            "in the model config, e.g. model.layout='{blocks: model.layers, ffn: mlp, w1: mlp.fc1, w2: mlp.fc2, "
            "act: mlp.act}' (fields: d2dmoe.models.layouts.Layout)")
    return LAYOUTS[model_type]


def conv1d_to_linear(conv) -> nn.Linear:
    """transformers' Conv1D (weight [in, out]) as the equivalent nn.Linear (weight [out, in])."""
    d_in, d_out = conv.weight.shape
    linear = nn.Linear(d_in, d_out)
    linear.weight.data.copy_(conv.weight.detach().T)
    linear.bias.data.copy_(conv.bias.detach())
    return linear


def get(root: nn.Module, path: str):
    return attrgetter(path)(root)


def parent_and_name(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, name = path.rpartition(".")
    return (get(root, head) if head else root), name


def put(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, name = parent_and_name(root, path)
    setattr(parent, name, module)
