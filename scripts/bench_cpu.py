"""Training speed of this project's GPT against a plain GPT of equal matmul work, on the CPU.

The plain GPT is nanoGPT's shape: learned positions, LayerNorm, one fused QKV projection, a GELU MLP
four times as wide. Ours (the `model` block, in 01_pretrain.py's section 2) has rotary positions,
RMSNorm, a SwiGLU MLP 8/3 as wide, and here one key/value head per query head, so both do the same
matrix products per token. Each step is forward + backward + AdamW on the same batch size; steps of
the models are interleaved in one process, so the machine's state is the same for all. Prints the
median tokens/s of each and their ratio; with --compile, also both under torch.compile; with
--profile, where each model's time goes per step, by kind of operation (torch.profiler, self CPU
time).

    python scripts/bench_cpu.py --steps 10 --compile --profile   # the table in RESULTS.md
    python scripts/bench_cpu.py --steps 4 --sizes 2,64,512,64,8  # a quick look
    python scripts/bench_cpu.py --generate runs/04_dpo           # sampling: finished rows dropped or not
    python scripts/bench_cpu.py --against 4026170 --generate runs/04_dpo   # sampling and SAE steps, today
                                                                 # against the code of an earlier commit

--generate times stage 05's pass@k sampling (its held-out problems, 64 replies each, one generator
per reply) on a checkpoint, with the rows whose reply has ended dropped from the batch (the default,
DROP_FINISHED) and computed to the end of the batch's longest reply; the replies must be identical.

--against REV times today's code against the stage files as they were at the git revision REV, in one
process, turn about: stage 05's sampling on the --generate checkpoint (the replies must be identical),
stage 07's SAE training steps at the CPU preset's main dictionary (the trained weights must be identical),
and stage 06's judge steps on the checkpoint (losses and gradients equal to float rounding: the head and
softmax run at the answer's positions only since the model's `at`).

Time it alone: another job on the same cores changes both numbers, not always equally.
"""
import argparse
import copy
import importlib.util
import json
import math
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_stage(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain = load_stage("01_pretrain")


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


# Profiler op names -> the kind of work, for the per-step breakdown.
KINDS = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm")),
         ("attention", ("scaled_dot_product", "attention")),
         ("softmax + loss", ("log_softmax", "nll_loss", "cross_entropy")),
         ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::pow",
                          "aten::rsqrt", "aten::mean", "aten::sum", "silu", "gelu", "aten::cat", "norm",
                          "aten::sqrt", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::_foreach")),
         ("fill + copy", ("aten::fill_", "aten::zero_", "aten::copy_", "aten::clone", "aten::contiguous")))


def kind_of(name):
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "other")


def profile_ms(step, n=3):
    """Self CPU milliseconds per step, by kind of operation."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    ms = {}
    for event in prof.key_averages():
        kind = kind_of(event.key)
        ms[kind] = ms.get(kind, 0.0) + event.self_cpu_time_total / 1e3 / n
    return ms


def bench(depth, width, vocab, seq_len, batch, steps, compile_too, profile):
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq_len))
    y = torch.randint(0, vocab, (batch, seq_len))
    nets = models(depth, width, vocab, seq_len)
    if compile_too:
        for name in ("ours", "plain"):
            nets[name + " compiled"] = torch.compile(copy.deepcopy(nets[name]))   # same weights
    steps_of = {name: step_fn(net, x, y) for name, net in nets.items()}
    for step in steps_of.values():   # warm-up: compilation, allocator, thread pool, first touch
        step()
        step()
    times = {name: [] for name in nets}
    for _ in range(steps):
        for name, step in steps_of.items():   # interleaved, so all see the same machine
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    tok_s = {name: batch * seq_len / statistics.median(t) for name, t in times.items()}
    flops = {name: matmul_flops_per_token(nets[name]) / 1e6 for name in ("ours", "plain")}
    line = (f"{depth:>5} {width:>5} {vocab:>6} {seq_len:>4} {batch:>5} | "
            f"{flops['ours']:>6.2f} {flops['plain']:>6.2f} | "
            f"{tok_s['ours']:>7,.0f} {tok_s['plain']:>7,.0f} {tok_s['ours'] / tok_s['plain']:>5.2f}")
    if compile_too:
        ours, plain = tok_s["ours compiled"], tok_s["plain compiled"]
        line += f" | {ours:>7,.0f} {plain:>7,.0f} {ours / plain:>5.2f} {ours / tok_s['plain']:>7.2f}"
    print(line, flush=True)
    if profile:
        ms = {name: profile_ms(steps_of[name]) for name in ("ours", "plain")}
        print(f"  where a step's time goes (ms, self CPU time, {depth}x{width}):")
        print(f"  {'kind':<16} {'ours':>8} {'plain':>8} {'ours - plain':>13}")
        for kind in [k for k, _ in KINDS] + ["other"]:
            a, b = ms["ours"].get(kind, 0.0), ms["plain"].get(kind, 0.0)
            print(f"  {kind:<16} {a:>8.1f} {b:>8.1f} {a - b:>+13.1f}")
        a, b = sum(ms["ours"].values()), sum(ms["plain"].values())
        print(f"  {'total':<16} {a:>8.1f} {b:>8.1f} {a - b:>+13.1f}", flush=True)


def bench_generation(folder, n_per_cell, samples, batch_size, repeats=2):
    grpo = load_stage("05_grpo_reasoning")
    folder = pathlib.Path(folder)
    model, _ = grpo.load_model(folder, "cpu", "pass a stage 02-06 folder")
    enc = grpo.load_tokenizer(folder, "pass a stage 02-06 folder")
    world = json.loads((folder / "world.json").read_text())
    problems = grpo.make_eval_problems(world, grpo.FAMILIES, n_per_cell, 1337)
    prompts = [grpo.problem_prompt(enc, p) for p in problems]
    args = argparse.Namespace(seed=1337, max_new_tokens=64, device="cpu", gen_batch=batch_size)
    times, replies, default = {"to the end": [], "dropped": []}, {}, grpo.DROP_FINISHED
    for _ in range(repeats):
        for name, share in (("to the end", 2.0), ("dropped", default)):   # 2.0: never dropped
            grpo.DROP_FINISHED = share
            t = time.perf_counter()
            replies[name] = grpo.sample(model, enc, prompts, samples, args, 1.0, "bench")
            times[name].append(time.perf_counter() - t)
    grpo.DROP_FINISHED = default
    assert replies["to the end"] == replies["dropped"], "dropping finished rows changed the replies"
    lengths = [len(ids) for group in replies["dropped"] for ids, _ in group]
    slow, fast = min(times["to the end"]), min(times["dropped"])
    cap = args.max_new_tokens
    print(f"{len(prompts)} problems x {samples} replies, batch {batch_size}, up to {cap} new tokens; replies "
          f"{statistics.mean(lengths):.1f} tokens on average, {sum(n == cap for n in lengths)} cut off")
    print(f"{'finished rows':<14} {'seconds':>8} {'tokens/s':>9}")
    for name, sec in (("to the end", slow), ("dropped", fast)):
        print(f"{name:<14} {sec:>8.1f} {sum(lengths) / sec:>9,.0f}")
    print(f"speed-up {slow / fast:.2f}x (best of {repeats}; identical replies)")


def load_stage_at(name, rev):
    """The stage file as it was at git revision rev, imported as a module of its own."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}.py"], capture_output=True,
                          text=True, check=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / f"{name}_at_{rev}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = sys.modules[path.stem] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def turn_about(jobs, repeats):
    """Run each named job `repeats` times, turn about; -> ({name: best seconds}, {name: last result})."""
    times, results = {name: [] for name in jobs}, {}
    for _ in range(repeats):
        for name, job in jobs.items():
            t = time.perf_counter()
            results[name] = job()
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}, results


def bench_against(rev, folder, n_per_cell, samples, repeats=3, sae_steps=60):
    """Stage 05's sampling and stage 07's SAE steps, today's code against rev's, in this process."""
    now = {n: load_stage(n) for n in ("05_grpo_reasoning", "07_sae_interp")}
    then = {n: load_stage_at(n, rev) for n in now}
    stage05 = {rev: then["05_grpo_reasoning"], "today": now["05_grpo_reasoning"]}
    models = {when: m.load_model(pathlib.Path(folder), "cpu", "pass a stage 02-06 folder")[0]   # each its own
              for when, m in stage05.items()}                                                 # model block
    enc = now["05_grpo_reasoning"].load_tokenizer(pathlib.Path(folder), "pass a stage 02-06 folder")
    world = json.loads((pathlib.Path(folder) / "world.json").read_text())
    problems = now["05_grpo_reasoning"].make_eval_problems(world, now["05_grpo_reasoning"].FAMILIES,
                                                           n_per_cell, 1337)
    prompts = [now["05_grpo_reasoning"].problem_prompt(enc, p) for p in problems]
    args = argparse.Namespace(seed=1337, max_new_tokens=64, device="cpu", gen_batch=64, batch_size=64,
                              sae_lr=1e-3, sae_steps=sae_steps, sae_batch=1024)
    sample = {when: (lambda m=m, when=when: m.sample(models[when], enc, prompts, samples, args, 1.0, "bench"))
              for when, m in stage05.items()}
    seconds, replies = turn_about(sample, repeats)
    assert replies[rev] == replies["today"], "the replies differ"
    tokens = sum(len(ids) for group in replies["today"] for ids, _ in group)
    X = torch.randn(20000, models["today"].config.n_embd, generator=torch.Generator().manual_seed(0))
    train = {when: (lambda m=m: m["07_sae_interp"].train_sae(X, 16 * X.size(1), "topk", 32, 0.0, args, 0)[0])
             for when, m in ((rev, then), ("today", now))}
    sae_seconds, saes = turn_about(train, repeats)
    assert all(torch.equal(a, b) for a, b in zip(saes[rev].parameters(), saes["today"].parameters()))
    judge_seconds, n_lessons = judge_steps(rev, folder, world, enc, repeats)
    print(f"{len(prompts)} problems x {samples} replies at batch 64 ({tokens:,} tokens); SAE: {sae_steps} "
          f"steps of 1,024 tokens, {16 * X.size(1)} latents, k 32 (identical); judge: {JUDGE_STEPS} steps "
          f"over stage 06's {n_lessons} lessons (losses, gradients equal to 1e-5); best of {repeats}, "
          "turn about")
    print(f"{'code':<10} {'sampling tokens/s':>18} {'SAE steps/s':>12} {'judge steps/s':>14}")
    for when in (rev, "today"):
        print(f"{when:<10} {tokens / seconds[when]:>18,.0f} {sae_steps / sae_seconds[when]:>12.1f} "
              f"{JUDGE_STEPS / judge_seconds[when]:>14.2f}")
    print(f"{'ratio':<10} {seconds[rev] / seconds['today']:>17.2f}x "
          f"{sae_seconds[rev] / sae_seconds['today']:>11.2f}x "
          f"{judge_seconds[rev] / judge_seconds['today']:>13.2f}x")


JUDGE_STEPS = 4


def judge_steps(rev, folder, world, enc, repeats):
    """Stage 06's judge lessons, forward and backward (the CPU preset's batch of 32 lessons, two options
    each), today's code against rev's, each with its own model block; -> ({when: seconds}, lessons)."""
    stages = {rev: load_stage_at("06_character", rev), "today": load_stage("06_character")}
    ix = stages["today"].world_index(world)
    lessons = stages["today"].judge_lessons(ix, enc, JUDGE_STEPS * 16, 1337)[:JUDGE_STEPS * 32]
    pad = enc.encode_single_token("<|pad|>")
    models = {when: m.load_model(pathlib.Path(folder), "cpu")[0] for when, m in stages.items()}

    def steps(when):
        m, model, losses = stages[when], models[when], []
        model.zero_grad()
        for i in range(0, len(lessons), 32):
            chunk = lessons[i:i + 32]
            lp = m.answer_logprob_pairs(model, enc, [ids for ids, _ in chunk], pad)
            loss = m.judge_loss(lp, torch.tensor([a for _, a in chunk]))
            loss.backward()
            losses.append(loss.item())
        return losses, [q.grad.clone() for q in model.parameters()]
    seconds, results = turn_about({when: (lambda when=when: steps(when)) for when in stages}, repeats)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*(results[w][1] for w in stages)))
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(*(results[w][0] for w in stages)))
    return seconds, len(lessons)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="4,128,2048,256,32;6,384,8192,256,16",
                   help="depth,width,vocab,seq_len,batch; more sizes separated by ;")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    p.add_argument("--profile", action="store_true", help="also print where each model's time goes")
    p.add_argument("--generate", metavar="FOLDER",
                   help="instead, time stage 05's sampling on this checkpoint")
    p.add_argument("--problems", type=int, default=10, help="with --generate: held-out problems per cell")
    p.add_argument("--against", metavar="REV", help="with --generate: time today's code against REV's")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.against:
        return bench_against(args.against, args.generate, args.problems, 8)
    if args.generate:
        return bench_generation(args.generate, args.problems, 64, 256)
    print(f"torch {torch.__version__}, {args.threads} threads; median of {args.steps} interleaved steps "
          f"(forward + backward + AdamW); tokens/s")
    head = (f"{'depth':>5} {'width':>5} {'vocab':>6} {'T':>4} {'batch':>5} | {'MFLOP/tok':>13} | "
            f"{'ours':>7} {'plain':>7} {'ratio':>5}")
    if args.compile:
        head += f" | {'ours c':>7} {'plain c':>7} {'ratio':>5} {'c/eager':>5}"
    print(head)
    for size in args.sizes.split(";"):
        bench(*map(int, size.split(",")), args.steps, args.compile, args.profile)


if __name__ == "__main__":
    main()
