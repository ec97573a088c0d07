"""Benchmark: wall-clock time against counted MACs, on this machine's CPU threads.

1. One MoE layer (gather execution: only the chosen experts run) against the dense MLP of the same
   shape, at MiniLM (d=384, d_ff=1536) and BERT-base (d=768, d_ff=3072) sizes, each with 128 experts
   (the defaults' 12 and 24 neurons) and 32 experts (48 and 96 neurons), on 32 sequences of 128
   tokens, each token running exactly round(fraction * E) random experts; inference (no autograd).
2. The converted built-in default at each tau against its dense model, over the test split, in one
   run (the artifacts are reused, or trained first): in float32 with the experts' execution
   --model-impl (auto: per layer and call, the fastest of gather and masked at the call's fraction of
   experts, timed on the layer's own routing of a validation batch at each tau), and with torch's dynamic
   int8, the dense model quantized in one line against the converted model with int8 experts, and in
   bfloat16 (both models cast, inputs autocast: what a user tries on a CPU with bfloat16 matrix units).
Medians over repeats after a warm-up. Prints both tables and writes them to bench_wallclock.json.

    python experiments/bench_wallclock.py [hydra overrides for part 2] [--repeats 5] [--layer-only | --model-only]
    python experiments/bench_wallclock.py --device cuda [--dtype bfloat16] [--cuda-graph]   # part 1 on a GPU, fused kernel

--layer-only measures part 1 and keeps the whole-model rows already in the output file;
--model-only measures part 2 and keeps the layer rows. --device cuda measures part 1 only, with
the fused Triton kernel unless --impl says otherwise, into benchmark/bench_wallclock_cuda.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from d2dmoe.moe import FFN, MoE, Router, fused_unavailable

FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
SIZES = {"minilm": (384, 1536), "bert_base": (768, 3072)}  # d, d_ff
EXPERTS = (128, 32)
MODEL_KEYS = ("model_overrides", "model_repeats", "model_commit", "model_dedup", "model_cpu", "model_impl", "model", "model_int8",
              "model_bf16", "model_fastest")


def median_ms(fn, repeats: int, device: str = "cpu", cuda_graph: bool = False) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None  # GPU work is asynchronous
    if cuda_graph:  # the host launches the whole call at once: the time is the GPU's
        from d2dmoe.fused import capture

        fn = capture(fn)[0].replay
    fn()  # warm-up (on a GPU also the kernel's compilation)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def layer_pair(d: int, d_ff: int, E: int, device: str, dtype: torch.dtype, impl: str) -> tuple[FFN, MoE]:
    """A random dense MLP (ReLU) and the MoE cut from it into E experts, executing with `impl`."""
    torch.manual_seed(0)
    ffn = FFN(nn.Linear(d, d_ff), nn.Linear(d_ff, d), nn.ReLU())
    moe = MoE.from_ffn(ffn, list(torch.arange(d_ff).chunk(E)), Router(d, E))
    ffn, moe = ffn.to(device, dtype), moe.to(device, dtype)
    moe.impl = impl
    return ffn, moe


def peer_module():
    """experiments/peer.py, whether this file runs as a script or is imported as experiments.bench_wallclock."""
    try:
        from . import peer
    except ImportError:
        import peer
    return peer


def layer_rows(repeats: int, device: str = "cpu", impl: str = "gather",
               dtype: torch.dtype = torch.float32, cuda_graph: bool = False, also: tuple[str, ...] = (),
               peer=None) -> list[dict]:
    """The table's rows; `also`: more executions of the same layer (e.g. grouped, masked), and `peer`:
    the official D2DMoE kernels (peer.py's module), each timed on the same masks as `<name>_ratio`."""
    rows = []
    for (name, (d, d_ff)), E in ((size, E) for size in SIZES.items() for E in EXPERTS):
        ffn, moe = layer_pair(d, d_ff, E, device, dtype, impl)
        x = torch.randn(32, 128, d, device=device, dtype=dtype)  # [B, T, d]
        with torch.inference_mode():
            dense_ms = median_ms(lambda: ffn(x), repeats, device, cuda_graph)
        others = {other: (lambda m, o=other: moe.execute(x, m, o)) for other in also}
        if peer is not None:
            for variant in peer_module().VARIANTS:
                run = peer_module().PeerExperts(peer, moe, variant)
                others[f"peer_{variant}"] = lambda m, r=run: r(x.reshape(-1, d), m.reshape(-1, E))
        for fraction in FRACTIONS:
            k = max(1, round(fraction * E))
            chosen = torch.rand(32, 128, E).topk(k, dim=-1).indices
            mask = torch.zeros(32, 128, E, dtype=torch.bool).scatter_(-1, chosen, True).to(device)
            moe.gate = lambda scores, m=mask: m  # exactly k random experts per token
            with torch.inference_mode():
                moe_ms = median_ms(lambda: moe(x), repeats, device, cuda_graph)
            router = d * 128 + 128 * E
            flop_ratio = (router + k * 2 * d * (d_ff // E)) / (2 * d * d_ff)
            row = {"size": name, "experts": E, "expert_size": d_ff // E, "fraction": k / E, "moe_ms": round(moe_ms, 2),
                   "dense_ms": round(dense_ms, 2), "flop_ratio": round(flop_ratio, 4),
                   "time_ratio": round(moe_ms / dense_ms, 4)}
            for other, fn in others.items():  # without the router: the experts alone, on the same mask
                graph = cuda_graph and other != "grouped"  # grouped counts its pairs on the host
                try:
                    with torch.inference_mode():
                        row[f"{other}_ratio"] = round(median_ms(lambda: fn(mask), repeats, device, graph) / dense_ms, 4)
                except (RuntimeError, NotImplementedError) as error:  # e.g. a dtype the library lacks
                    row[f"{other}_ratio"] = None
                    print(f"{other}, {name}, {E} experts: {str(error).splitlines()[0]}", flush=True)
            rows.append(row)
    return rows


def model_rows(overrides: list[str], repeats: int, impl: str = "auto") -> dict:
    """The dense model and the converted one at each tau, in float32 ("model") and with torch's dynamic
    int8 ("model_int8": the dense model quantized in one line, and the converted model with int8
    experts and layers, int8.py) and in bfloat16 ("model_bf16": both models cast to it); every
    time_ratio against the dense float32 model. With impl auto, also what it measured ("model_fastest")."""
    from hydra import compose, initialize_config_dir

    from d2dmoe.crossover import calibrate
    from d2dmoe.int8 import converted_int8, dense_int8
    from d2dmoe.crossover import set_impl
    from d2dmoe.moe import DynamicKGate, moe_layers, set_gate
    from d2dmoe.phases.evaluate import Evaluation
    from d2dmoe.pipeline import convert

    from d2dmoe.conf import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=none", *overrides])
    ctx, dense, moe = convert(cfg)
    test, val = list(ctx.data.test_dataloader()), list(ctx.data.val_dataloader())
    adapter, task = ctx.adapter, ctx.adapter.task

    def score(model, batches) -> float:
        with torch.inference_mode():
            parts = [task.score(forward(model, b), b, adapter.token_mask(b)) for b in batches]
        return sum(t for t, _ in parts) / sum(c for _, c in parts)

    def forward(model, batch):
        """A bfloat16 model gets its float inputs (pixels) cast by autocast, its outputs back in float32."""
        if next(model.parameters()).dtype != torch.bfloat16:
            return adapter.forward(model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return adapter.forward(model, batch).float()

    def timed(model) -> tuple[float, float]:
        """(median ms of a pass over the test split, test metric) with the model as it is set; the
        metric is the timed passes' own."""
        model.eval()
        values = []
        ms = median_ms(lambda: values.append(score(model, test)), repeats)
        return ms, values[-1]

    def counted(model) -> dict:
        """The counted test cost, and the validation numbers a reader chooses a tau with."""
        ev = ctx.test(Evaluation(model, adapter, ctx.dims))
        val_ev = ctx.test(Evaluation(model, adapter, ctx.dims, split="validation"), split="validation")
        return {"rel_cost": round(ev.rel_cost, 4), "val_rel_cost": round(val_ev.rel_cost, 4),
                "val_value": val_ev.value}

    def row(tau, ms, value, base: dict, **more) -> dict:
        return {"tau": tau, "rel_cost": base["rel_cost"], "time_ratio": round(ms / dense_ms, 4),
                task.metric: value, "ms": round(ms, 1), "val_rel_cost": base["val_rel_cost"], **more}

    dense_ms, dense_value = timed(dense)
    base = {**counted(dense), "rel_cost": 1.0}
    # whether the splits had their repeats removed (d2dmoe.dedup): the README says so of rows without
    rows = {"model_dedup": bool(cfg.data.get("dedup", False)),
            "model": [row(None, dense_ms, dense_value, base, val_value=base["val_value"])]}
    quantized = dense_int8(dense).eval()
    ms, value = timed(quantized)
    rows["model_int8"] = [row(None, ms, value, base, val_value=score(quantized, val))]
    dense_bf16 = copy.deepcopy(dense).bfloat16().eval()
    ms, value = timed(dense_bf16)
    rows["model_bf16"] = [row(None, ms, value, base, val_value=score(dense_bf16, val))]
    moe_int8, moe_bf16 = converted_int8(moe), copy.deepcopy(moe).bfloat16()
    variants = {"float32": moe, "int8": moe_int8, "bfloat16": moe_bf16}
    for model in variants.values():
        if impl == "auto":  # each layer's executions timed on its own routing of a validation batch, per tau
            calibrate(model, lambda m=model: forward(m, val[0]), cfg.routing.taus)
        else:
            set_impl(model, impl)
    if impl == "auto":
        rows["model_fastest"] = {name: {f"layer {i}": m.fastest for i, m in enumerate(moe_layers(model))}
                                 for name, model in variants.items()}
    for tau in cfg.routing.taus:
        for model in variants.values():
            set_gate(model, DynamicKGate(float(tau)))
        base = counted(moe)  # the MACs count the same either way
        ms, value = timed(moe)
        rows["model"].append(row(float(tau), ms, value, base, val_value=base["val_value"]))
        for key, model in (("model_int8", moe_int8), ("model_bf16", moe_bf16)):
            ms, value = timed(model)
            rows[key].append(row(float(tau), ms, value, base, val_value=score(model, val)))
        print(f"tau {tau}: float32 {rows['model'][-1]}\n         int8 {rows['model_int8'][-1]}\n"
              f"         bfloat16 {rows['model_bf16'][-1]}", flush=True)
    return rows


def synthetic_model_rows(repeats: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
                         impls: tuple[str, ...] = ("gather",), fraction: float = 0.1, size: dict | None = None,
                         experts: tuple[int, ...] = EXPERTS, batch: tuple[int, int] = (64, 128)) -> list[dict]:
    """A whole converted model against its dense original, untrained: BERT (BERT-base unless `size`
    gives BertConfig fields) with a 2-class head, every FFN cut into E experts with a router, each
    token running exactly round(fraction * E) of them (top-k of its router's scores: routers
    included). Random token ids, batch x tokens; inference."""
    import copy

    from transformers import BertConfig, BertForSequenceClassification

    from d2dmoe.models.bert import BertAdapter
    from d2dmoe.crossover import set_impl
    from d2dmoe.moe import TopKGate, moe_layers, set_gate
    from d2dmoe.phases.split import moe_skeleton

    def mean_experts(model) -> float:  # experts per token over every layer's last call
        return sum(m.last_mask.sum(-1).float().mean().item() for m in moe_layers(model)) / len(moe_layers(model))

    torch.manual_seed(0)
    config = BertConfig(num_labels=2, **(size or {}))
    config._attn_implementation = "sdpa"
    adapter = BertAdapter(name="synthetic", pretrained=False)
    original = adapter.install_ffns(BertForSequenceClassification(config)).eval()
    dense = copy.deepcopy(original).to(device, dtype)
    ids = torch.randint(0, config.vocab_size, batch, device=device)  # [B, T]
    with torch.inference_mode():
        dense_ms = median_ms(lambda: dense(input_ids=ids), repeats, device)
    rows = []
    for E in experts:
        moe = moe_skeleton(adapter, copy.deepcopy(original), E, 128).to(device, dtype).eval()
        k = max(1, round(fraction * E))
        set_gate(moe, TopKGate(k))
        for impl in impls:
            set_impl(moe, impl)
            with torch.inference_mode():
                ms = median_ms(lambda: moe(input_ids=ids), repeats, device)
            rows.append({"layers": config.num_hidden_layers, "d": config.hidden_size, "d_ff": config.intermediate_size,
                         "experts": E, "fraction": k / E, "impl": impl, "batch": list(batch), "dense_ms": round(dense_ms, 3),
                         "moe_ms": round(ms, 3), "speedup": round(dense_ms / ms, 3),
                         "experts_per_token": round(mean_experts(moe), 3)})  # as run, not as asked
            print(rows[-1], flush=True)
    return rows


def commit() -> str | None:
    """The checkout's commit (with "+changes" when the tree differs from it), or None outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def cpu_name() -> str | None:
    """The processor's model name: wall times (and which execution wins) differ from one CPU to the
    next, e.g. where the CPU has AMX tiles."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return name or platform.processor() or None


def show(rows: list[dict]) -> str:
    keys = list(rows[0])
    cells = [[("-" if r[k] is None else f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k])) for k in keys]
             for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(keys), line(["-" * w for w in widths])] + [line(c) for c in cells])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the whole-model part")
    parser.add_argument("--repeats", type=int, default=5)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--layer-only", action="store_true")
    only.add_argument("--model-only", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--impl", choices=["gather", "grouped", "fused"], help="the layer table's execution "
                        "(default: gather on cpu, fused on cuda)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time each layer call as a CUDA graph replay (cuda, fused): the GPU's time alone")
    parser.add_argument("--also", default="", help="more executions for the layer table, timed on the same "
                        "masks without the router, comma-separated: grouped, masked, gather, fused")
    parser.add_argument("--peer", help="a checkout of github.com/bartwojcik/D2DMoE: time its expert kernels "
                        "in the layer table (GPU, or Triton's interpreter)")
    parser.add_argument("--peer-configs", type=int, help="about this many of each peer kernel's autotuning "
                        "configs, spread over its list (default: all of them)")
    parser.add_argument("--synthetic-model", action="store_true", help="only the whole converted model at "
                        "BERT-base size, untrained, 64 x 128 tokens, a tenth of the experts (routers included)")
    parser.add_argument("--model-impl", default="auto", choices=["auto", "gather", "masked"],
                        help="the whole-model part's execution of the experts (default: auto)")
    parser.add_argument("--out", help="default benchmark/bench_wallclock.json (cpu), "
                        "benchmark/bench_wallclock_cuda.json (cuda)")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if gpu and args.model_only:
        parser.error("--device cuda measures the layer table only")
    impl = args.impl or ("fused" if gpu else "gather")
    if impl == "fused" and (reason := fused_unavailable()):
        parser.error(reason)
    if args.cuda_graph and not (gpu and impl == "fused"):
        parser.error("--cuda-graph needs --device cuda and the fused execution (gather waits on the host)")

    if args.synthetic_model:
        impls = ("fused", "grouped", "masked", "auto") if gpu else ("gather", "grouped", "masked", "auto")
        rows = synthetic_model_rows(args.repeats, args.device, getattr(torch, args.dtype), impls)
        out = Path(args.out or f"benchmark/bench_wallclock_model{'_cuda' if gpu else ''}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": torch.cuda.get_device_name() if gpu else "cpu", "dtype": args.dtype,
                                   "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows}, indent=2))
        print(show(rows))
        return
    out = Path(args.out or f"benchmark/bench_wallclock{'_cuda' if gpu else ''}.json")
    earlier = json.loads(out.read_text()) if out.exists() else {}
    device = torch.cuda.get_device_name() if gpu else "cpu"
    result = {"threads": torch.get_num_threads(), "device": device, "cpu": cpu_name(), "repeats": args.repeats,
              "impl": impl, "dtype": args.dtype, "cuda_graph": args.cuda_graph}
    if args.model_only:  # keep the earlier layer rows ("repeats" is the layer table's)
        result["cpu"] = earlier.get("cpu")  # the layer rows' processor (None: not recorded)
        result.update({k: earlier[k] for k in ("repeats", "impl", "dtype", "layer") if k in earlier})
    else:
        peer = None
        if args.peer:  # the official kernels, from the checkout given
            peer = peer_module().load(args.peer)
            peer_module().limit_configs(peer, args.peer_configs)
            result["peer"] = {"checkout": str(args.peer), "configs_per_kernel": args.peer_configs or "all"}
        also = tuple(a for a in args.also.split(",") if a)
        result["layer"] = layer_rows(args.repeats, args.device, impl, getattr(torch, args.dtype), args.cuda_graph,
                                     also, peer)
        print(f"One layer, 32 x 128 tokens, {device}, {result['threads']} threads, {impl} execution, "
              f"{args.dtype}{', CUDA graph replays' if args.cuda_graph else ''}, medians:\n{show(result['layer'])}\n",
              flush=True)
        if impl == "fused":  # the tiles autotuning chose for each layer shape
            from d2dmoe.fused import CHOSEN

            result["tiles"] = {f"d={v[0]}, expert_size={v[1]}": str(config) for v, config in CHOSEN.items()}
            print("\n".join(f"{shape}: {config}" for shape, config in result["tiles"].items()), "\n")
    if args.layer_only or gpu:  # keep the earlier whole-model rows
        result.update({k: earlier[k] for k in MODEL_KEYS if k in earlier})
    else:
        result["model_overrides"], result["model_repeats"] = args.overrides, args.repeats
        result["model_commit"] = commit()  # the model is whatever the defaults of that code trained
        result["model_cpu"] = cpu_name()
        result["model_impl"] = args.model_impl
        result.update(model_rows(args.overrides, args.repeats, args.model_impl))
        print(f"Whole converted model on the test split, float32, experts.impl={args.model_impl}:\n"
              f"{show(result['model'])}\n\nThe same with int8 (dynamic quantization):\n{show(result['model_int8'])}\n"
              f"\nThe same in bfloat16:\n{show(result['model_bf16'])}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
