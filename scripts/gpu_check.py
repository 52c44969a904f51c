"""What a CUDA GPU shows that the CPU tests cannot: the machine's two ceilings, and whether
torch.compile traces through the autograd Functions that launch the Triton kernels.

1. Ceilings: a bf16 8192^3 matrix product on random data (TFLOP/s) and a device-to-device copy
   (GB/s, bytes read + written). Every MFU and bandwidth figure is read against these.
2. torch.compile: stage 01's GPT (the GPU preset's shape, or --n_experts for the MoE layers) with
   the Triton kernels and with PyTorch's own attention, eager and compiled. For each: dynamo's graph
   count and graph breaks, the compiled loss and gradients against eager, and the time of one
   forward + backward micro-batch (median of 20, after warm-up) with its tokens/s and MFU.

    python scripts/gpu_check.py                       # both, on CUDA
    python scripts/gpu_check.py --n_experts 8         # the MoE model
    python scripts/gpu_check.py --smoke               # a tiny model on the CPU: checks this script
"""
import argparse
import importlib.util
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import kernels  # noqa: E402

spec = importlib.util.spec_from_file_location("pretrain", ROOT / "01_pretrain.py")
pretrain = sys.modules["pretrain"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pretrain)


def timed(fn, device, repeats=20, warmup=3):
    """Median seconds of fn(), after warm-up (which includes compilation)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ceilings():
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul = 2 * n ** 3 / timed(lambda: a @ b, "cuda") / 1e12
    src = torch.randn(2 ** 30 // 4, device="cuda")  # 1 GiB of fp32
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), "cuda") / 1e9
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{getattr(kernels.triton, '__version__', '-') if kernels.HAS_TRITON else 'none'}")
    print(f"ceilings: bf16 matmul 8192^3 {matmul:.0f} TFLOP/s (random data); copy {copy:.0f} GB/s (read+write)")


def model_and_batch(args):
    config = pretrain.GPTConfig(vocab_size=args.vocab, n_layer=args.depth, n_embd=args.width,
                                n_head=args.width // args.head_dim, n_kv_head=args.width // args.head_dim // 2,
                                mlp_hidden=32 * -(-8 * args.width // 3 // 32), seq_len=args.seq_len,
                                n_experts=args.n_experts)
    model = pretrain.GPT(config)
    model.init_weights(0)
    model.to(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(args.device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(args.device)
    return model, x, y


def loss_and_grads(model, x, y, autocast):
    model.zero_grad(set_to_none=True)
    with autocast:
        loss = model(x, y)
    loss.backward()
    return loss.detach().float(), [p.grad.detach().float().clone() for p in model.parameters() if p.grad is not None]


def compile_check(args):
    """Eager against compiled, for each attention backend; a table row each."""
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda"
                else torch.autocast("cpu", enabled=False))
    peak = pretrain.peak_flops(args.device)
    print(f"\ntorch.compile through the kernels: depth {args.depth}, width {args.width}, seq {args.seq_len}, "
          f"batch {args.batch}, experts {args.n_experts}; one forward + backward, bf16 autocast on CUDA")
    print(f"{'kernels':>7} {'mode':>8} | {'graphs':>6} {'breaks':>6} | {'loss diff':>9} {'grad rel err':>12} | "
          f"{'ms':>7} {'tokens/s':>10} {'MFU %':>6}")
    for backend in args.backends:
        kernels.set_backend(backend if args.device == "cuda" else "torch")
        model, x, y = model_and_batch(args)
        _, n_active = pretrain.count_parameters(model)
        flops_tok = pretrain.flops_per_token(model.config, n_active)
        eager_loss, eager_grads = loss_and_grads(model, x, y, autocast)
        for mode in ("eager", "compiled"):
            graphs = breaks = "-"
            run = model
            try:
                if mode == "compiled":
                    torch._dynamo.reset()
                    with autocast:
                        explained = torch._dynamo.explain(model)(x, y)
                    graphs, breaks = explained.graph_count, explained.graph_break_count
                    for reason in explained.break_reasons[:3]:
                        print(f"    graph break: {str(reason.reason).splitlines()[0][:150]}")
                    run = torch.compile(model)
                loss, grads = loss_and_grads(run, x, y, autocast)
                diff = abs(loss.item() - eager_loss.item())
                rel = max((g - e).norm().item() / max(e.norm().item(), 1e-12) for g, e in zip(grads, eager_grads))
                seconds = timed(lambda: loss_and_grads(run, x, y, autocast), args.device)
            except Exception as err:  # report and go on: this is what the check is for
                print(f"{backend:>7} {mode:>8} | failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                continue
            tok_s = x.numel() / seconds
            mfu = f"{pretrain.mfu_percent(tok_s, flops_tok, peak, 1):.1f}" if peak else "-"
            print(f"{backend:>7} {mode:>8} | {graphs:>6} {breaks:>6} | {diff:>9.1e} {rel:>12.1e} | "
                  f"{seconds * 1e3:>7.1f} {tok_s:>10,.0f} {mfu:>6}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=32, help="sequences per micro-batch")
    p.add_argument("--n_experts", type=int, default=0)
    p.add_argument("--backends", nargs="+", default=["triton", "torch"])
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (checks this script)")
    args = p.parse_args()
    if args.smoke:
        args.device, args.depth, args.width, args.head_dim, args.seq_len, args.vocab, args.batch = (
            "cpu", 2, 64, 32, 64, 256, 2)
    elif not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; --smoke runs a tiny model on the CPU instead.")
    else:
        args.device = "cuda"
        ceilings()
    compile_check(args)


if __name__ == "__main__":
    main()
