"""Training speed of this project's GPT against a plain GPT of equal matmul work, on the CPU.

The plain GPT is nanoGPT's shape: learned positions, LayerNorm, one fused QKV projection, a GELU MLP
four times as wide. Ours (Appendix B's `model` block) has rotary positions, RMSNorm, a SwiGLU MLP
8/3 as wide, and here one key/value head per query head, so both do the same matrix products per
token. Each step is forward + backward + AdamW on the same batch size; steps of the two models are
interleaved in one process, so the machine's state is the same for both. Prints the median tokens/s
of each and their ratio, then where our model's time goes (torch.profiler, self CPU time).

    python scripts/bench_cpu.py                     # the two sizes of issue 17, 2 threads
    python scripts/bench_cpu.py --steps 4 --sizes 2,64,512,64   # a quick look

Time it alone: another job on the same cores changes both numbers, not always equally.
"""
import argparse
import importlib.util
import math
import pathlib
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
spec = importlib.util.spec_from_file_location("pretrain", ROOT / "01_pretrain.py")
pretrain = sys.modules["pretrain"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pretrain)


class PlainBlock(nn.Module):
    def __init__(self, C, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(C, bias=False), nn.LayerNorm(C, bias=False)
        self.qkv, self.proj = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C, bias=False)
        self.fc, self.out = nn.Linear(C, 4 * C, bias=False), nn.Linear(4 * C, C, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class PlainGPT(nn.Module):
    """nanoGPT's model without dropout, biases or weight tying."""

    def __init__(self, vocab, C, n_layer, n_head, seq_len):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, C), nn.Embedding(seq_len, C)
        self.blocks = nn.ModuleList(PlainBlock(C, n_head) for _ in range(n_layer))
        self.ln, self.head = nn.LayerNorm(C, bias=False), nn.Linear(C, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def models(depth, width, vocab, seq_len, head_dim=32):
    n_head = width // head_dim
    ours = pretrain.GPT(pretrain.GPTConfig(vocab_size=vocab, n_layer=depth, n_embd=width, n_head=n_head,
                                           n_kv_head=n_head, mlp_hidden=32 * math.ceil(8 * width / 3 / 32),
                                           seq_len=seq_len))
    ours.init_weights(0)
    return {"ours": ours, "plain": PlainGPT(vocab, width, depth, n_head, seq_len)}


def step_fn(model, x, y):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def matmul_flops_per_token(model):
    """2 * (multiply-adds of every Linear) per token: the forward's matrix work, attention scores aside."""
    return 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def bench(depth, width, vocab, seq_len, batch, steps, profile):
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq_len))
    y = torch.randint(0, vocab, (batch, seq_len))
    nets = models(depth, width, vocab, seq_len)
    steps_of = {name: step_fn(net, x, y) for name, net in nets.items()}
    for step in steps_of.values():   # warm-up: allocator, thread pool, first-touch of the weights
        step()
    times = {name: [] for name in nets}
    for _ in range(steps):
        for name, step in steps_of.items():   # interleaved, so both see the same machine
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    tok_s = {name: batch * seq_len / statistics.median(t) for name, t in times.items()}
    flops = {name: matmul_flops_per_token(net) / 1e6 for name, net in nets.items()}
    print(f"{depth:>5} {width:>5} {vocab:>6} {seq_len:>4} {batch:>5} | {flops['ours']:>8.2f} {flops['plain']:>8.2f} | "
          f"{tok_s['ours']:>9,.0f} {tok_s['plain']:>9,.0f} {tok_s['ours'] / tok_s['plain']:>6.2f}")
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                steps_of["ours"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="4,128,2048,256,32;6,384,8192,256,16",
                   help="depth,width,vocab,seq_len,batch; more sizes separated by ;")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also print where our model's time goes")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; median of {args.steps} interleaved steps "
          f"(forward + backward + AdamW)")
    print(f"{'depth':>5} {'width':>5} {'vocab':>6} {'T':>4} {'batch':>5} | {'MFLOP/tok ours':>8} {'plain':>8} | "
          f"{'tok/s ours':>9} {'plain':>9} {'ratio':>6}")
    for size in args.sizes.split(";"):
        bench(*map(int, size.split(",")), args.steps, args.profile)


if __name__ == "__main__":
    main()
