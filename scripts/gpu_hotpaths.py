"""The course's hot paths on one GPU, as per-unit times that scripts/predict_gpu_course.py turns into a
predicted course time: each part prints its lines as it goes and rewrites --json after every number,
so a part killed by its time limit still leaves what it measured.

  sdpa    which backend PyTorch's SDPA picks for the course's attention (stage 01's GPU preset: head
          dim 64, grouped-query heads, causal, bf16), read from the profiler's kernel names, and its
          forward + backward time against each pinned backend and the Triton kernel (kernels.py)
  decode  ms per decoding step of the shared `generate` (stage 01's GPU-preset model, random weights,
          no stop ids so every row runs) at batch 64, 256 and 1,024, each under the bf16 autocast and
          bf16 KV cache generate takes on CUDA: eager (static=False, the path of a model with hooks,
          stage 07's edits) and graphed (static=True: the static cache, a CUDA graph replayed per
          step, every other call); the prefill (and the graph's capture) is taken out by timing two
          lengths. Greedy, the two paths' tokens are compared (bf16 sums in another order may part).
  train   ms per optimizer step (forward, backward, AdamW) eager: stage 01's micro-batch at its
          sequence length, and the chat stages' batch at --chat_tokens tokens per row
  sae     ms per step of stage 07's own train_sae for each dictionary its GPU preset trains (the main
          one and the sweep), on random activations held on the host as stage 07 holds them

    python scripts/gpu_hotpaths.py --json $OUT/hotpaths.json            # every part, on CUDA
    python scripts/gpu_hotpaths.py --parts decode sae --json x.json
    python scripts/gpu_hotpaths.py --smoke --json /tmp/x.json     # tiny, on the CPU: checks the script
"""
import argparse
import contextlib
import importlib.util
import json
import pathlib
import statistics
import sys
import time
import types

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import kernels  # noqa: E402


def load_stage(filename, name):
    spec = importlib.util.spec_from_file_location(name, ROOT / filename)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain = load_stage("01_pretrain.py", "pretrain")
RESULTS = {}


def record(key, value, where):
    """Store one number under RESULTS[key...] and rewrite the JSON at once (a kill loses nothing)."""
    node = RESULTS
    for part in key[:-1]:
        node = node.setdefault(part, {})
    node[key[-1]] = value
    where.write_text(json.dumps(RESULTS, indent=1, sort_keys=True))


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_s(fn, device, repeats=5, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gpu_model(args):
    """Stage 01's GPU-preset GPT (or tiny's under --smoke), random weights, on the device."""
    preset = pretrain.PRESETS[args.preset]
    shape = types.SimpleNamespace(**preset, gqa=2, n_experts=0, top_k=2, moe_every=2)
    model = pretrain.GPT(pretrain.model_config_from_args(shape, preset["vocab_size"]))
    model.init_weights(0)
    return model.to(args.device), preset


def part_sdpa(args):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model, preset = gpu_model(args)
    cfg = model.config
    B, T, D = 16384 // preset["seq_len"], preset["seq_len"], cfg.n_embd // cfg.n_head
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    q = torch.randn(B, cfg.n_head, T, D, device=args.device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, cfg.n_kv_head, T, D, device=args.device, dtype=dtype, requires_grad=True)
            for _ in range(2))
    do = torch.randn_like(q)
    print(f"attention: B {B}, heads {cfg.n_head}/{cfg.n_kv_head} (q/kv), T {T}, D {D}, {dtype}, causal")
    fwd_bwd = lambda attn: lambda: torch.autograd.grad(  # noqa: E731
        attn(q, k, v, causal=True), (q, k, v), do)
    if args.device == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fwd_bwd(kernels.attention_torch)()
            sync(args.device)
        words = ("attention", "fmha", "flash", "cudnn")
        names = sorted({e.key for e in prof.key_averages() if any(w in e.key.lower() for w in words)})
        print("SDPA's kernels (default dispatch):", *names[:8], sep="\n    ")
        record(("sdpa", "default_kernels"), names[:8], args.json)
    runs = {"default": (kernels.attention_torch, None)}
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        runs[name.lower()] = (kernels.attention_torch, getattr(SDPBackend, name))
    if kernels.HAS_TRITON and args.device == "cuda":
        runs["triton"] = (lambda q, k, v, causal: kernels._FlashAttention.apply(q, k, v, causal), None)
    for name, (attn, backend) in runs.items():
        try:
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                ms = 1e3 * median_s(fwd_bwd(attn), args.device)
        except Exception as err:  # noqa: BLE001  (a backend that refuses this shape is a result)
            print(f"  {name:<20} does not run: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
            continue
        print(f"  {name:<20} forward+backward {ms:8.2f} ms", flush=True)
        record(("sdpa", "fwd_bwd_ms", name), ms, args.json)


def part_decode(args):
    model, _ = gpu_model(args)
    short, long = (2, 6) if args.smoke else (8, 72)
    prompt_len = 8 if args.smoke else 64
    if args.device != "cuda":
        print("  (no GPU: 'graphed' runs the static cache eagerly, without a graph)")
    for batch in args.decode_batches:
        prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=args.device)
        tokens = {}
        for label, static in (("eager", False), ("graphed", True)):
            def run(n):
                return torch.stack(list(pretrain.generate(model, prompts, n, temperature=0, static=static)))
            ms = median_s(lambda: run(long), args.device, 3) - median_s(lambda: run(short), args.device, 3)
            ms *= 1e3 / (long - short)
            print(f"  decode {label:<8} batch {batch:>5}: {ms:7.3f} ms/step  "
                  f"({batch / ms * 1e3:,.0f} tokens/s)", flush=True)
            record(("decode_ms", label, str(batch)), ms, args.json)
            tokens[label] = run(long)
        same = (tokens["eager"] == tokens["graphed"]).float().mean().item()
        print(f"  greedy tokens the same on both paths at batch {batch}: {same:.1%}", flush=True)
        record(("decode_same_tokens", str(batch)), same, args.json)
    failed = pretrain.GraphedStep.failed
    record(("decode_graph_failed",), str(failed[0])[:300] if failed else None, args.json)


def train_step_ms(model, batch, seq, args):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (batch, seq), device=args.device)

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return 1e3 * median_s(step, args.device, 5, 2)


def part_train(args):
    model, preset = gpu_model(args)
    micro = preset["micro_batch"]
    ms = train_step_ms(model, micro, preset["seq_len"], args)
    print(f"  train, stage 01's micro-batch {micro} x {preset['seq_len']}: {ms:.2f} ms "
          "(eager, bf16 autocast on CUDA)", flush=True)
    record(("train_ms", "pretrain_micro"), ms, args.json)
    for batch in args.chat_batches:
        ms = train_step_ms(model, batch, args.chat_tokens, args)
        print(f"  train, chat batch {batch} x {args.chat_tokens}: {ms:.2f} ms", flush=True)
        record(("train_ms", f"chat{batch}x{args.chat_tokens}"), ms, args.json)


def part_sae(args):
    sae_stage = load_stage("07_sae_interp.py", "sae_interp")
    preset = sae_stage.PRESETS[args.preset]
    pre = pretrain.PRESETS[args.preset]
    d_model = pre["depth"] * pre["aspect"]
    X = torch.randn(20000 if args.smoke else 200_000, d_model)
    dictionaries = [("topk", preset["expansion"], preset["k"])] + [tuple(d) for d in preset["sweep"]]
    short, long = (2, 6) if args.smoke else (5, 25)
    for kind, expansion, k_or_l1 in dict.fromkeys(dictionaries):
        k, l1 = (k_or_l1, 0.0) if kind == "topk" else (preset["k"], k_or_l1)
        run_args = types.SimpleNamespace(sae_batch=preset["sae_batch"], sae_lr=1e-3, device=args.device)

        def run(steps):
            run_args.sae_steps = steps
            sae_stage.train_sae(X, expansion * d_model, kind, k, l1, run_args, seed=0)
        ms = median_s(lambda: run(long), args.device, 2) - median_s(lambda: run(short), args.device, 2)
        ms *= 1e3 / (long - short)
        key = f"{kind}:{expansion}:{k_or_l1}"
        print(f"  SAE step {key:<16} ({expansion * d_model} latents, batch {preset['sae_batch']}): "
              f"{ms:.2f} ms", flush=True)
        record(("sae_ms", key), ms, args.json)


PARTS = {"sdpa": part_sdpa, "decode": part_decode, "train": part_train, "sae": part_sae}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=pathlib.Path, required=True, help="where the numbers go")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--decode_batches", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--chat_batches", type=int, nargs="+", default=[64])
    p.add_argument("--chat_tokens", type=int, default=256,
                   help="tokens per row of a chat stage's training batch")
    p.add_argument("--smoke", action="store_true", help="the tiny preset on the CPU (checks this script)")
    args = p.parse_args()
    if args.smoke:
        args.device, args.preset = "cpu", "tiny"
        args.decode_batches, args.chat_batches, args.chat_tokens = [4, 8], [4], 32
    elif not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; --smoke checks the script on the CPU.")
    else:
        args.device, args.preset = "cuda", "gpu"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    record(("device",), device, args.json)
    record(("torch",), torch.__version__, args.json)
    print(f"{device}, torch {torch.__version__}, preset {args.preset}", flush=True)
    for part in args.parts:
        print(f"== {part}", flush=True)
        try:
            PARTS[part](args)
        except Exception as err:  # noqa: BLE001  (one part failing must not cost the others' numbers)
            print(f"  {part} failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
                  flush=True)
            record(("failed", part), f"{type(err).__name__}: {err}"[:300], args.json)


if __name__ == "__main__":
    main()
