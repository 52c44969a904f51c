"""Stage 01 - pretraining: a world, a tokenizer, and a Transformer that learns the world's facts.

Every assistant starts as a next-token predictor trained on a large pile of text. Here the pile is
written by this script: a seeded fictional world (people, towns, creatures, guilds, objects, events)
is generated, saved as `world.json` (the ground truth every later stage grades against), and told
in many kinds of documents - encyclopedia entries, biographies, letters, stories, dialogues, news,
question-answer pages, worked arithmetic (Appendix A). A byte-level BPE tokenizer is trained on
that text (section 3), and a decoder-only Transformer of the kind frontier labs build (section 2:
RoPE, RMSNorm, grouped-query attention, SwiGLU, optional Mixture-of-Experts, KV cache) learns to
predict it. Over a row of tokens x_0 .. x_T it minimises the next-token cross-entropy (with
experts, plus --moe_aux times the Switch load-balancing loss):

    L(theta) = -(1/T) sum_{t<T} log p_theta(x_{t+1} | x_0 .. x_t)        (nats per token)

Nats per token depend on the tokenizer (a bigger vocabulary packs more text into a token), so the
validation loss is reported in bits per byte of the predicted text, which does not:

    bpb = sum_t -log p_theta(x_{t+1} | x_0 .. x_t) / (ln 2 * sum_t bytes(x_{t+1}))

with bytes(x) the UTF-8 length of token x (special tokens carry no text and are not scored).
Beside it: fact completion, "<person> was born in" -> greedy continuation scored against
world.json, in a phrasing the documents use ("seen") and in one they never use ("held-out"), which
asks whether the model stored a fact or a sentence (Allen-Zhu & Li, arXiv 2309.14316); and speed:
tokens per second and, on a GPU, model FLOPs utilisation (6 FLOPs per active weight per token plus
attention's, over the device's peak; PaLM, arXiv 2204.02311, appendix B).

Where this small version departs from frontier practice, and why: the corpus is synthetic and
tiny, so that a fact gets hundreds of exposures (a small model needs them, see shared
notes/world.md) and every answer can be checked against world.json; the token budget follows the
world, not only Chinchilla's 20 tokens per parameter (printed for comparison); and documents are
written and tokenized on the fly instead of read from tokenized shards, so the stream is
random-access by index and a resumed run, or a DDP rank, needs only a document counter.

Reads: nothing (or --data text).  Writes: runs/01_pretrain/ with model.pt, tokenizer.json,
world.json, metrics.json, loss.png, report.md (and train_state.pt for --resume).

    python 01_pretrain.py                           # the default for this machine (CUDA or CPU)
    python 01_pretrain.py --preset tiny             # seconds on a laptop CPU (tests, CI)
    python 01_pretrain.py --n_experts 4 --top_k 2   # experiment: Mixture-of-Experts MLPs

The same script runs under `torchrun --nproc_per_node 8 01_pretrain.py` (DDP), and `--resume`
continues an interrupted run exactly (Ctrl-C saves first).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import pathlib
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import types
import zlib
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kernels  # noqa: E402  (attention and MoE: Triton on CUDA, PyTorch elsewhere)

# =====================================================================================
# 1. Configuration
# =====================================================================================
# One dial, --depth, sets the model: width = depth * aspect, heads = width / head_dim, and from the
# width the learning rate. A preset bundles a depth with a world size and a token budget that fit a
# machine. Any flag given on the command line wins over the preset.

PRESETS = {
    # seconds on 2 CPU cores: tests and CI. Learns little; proves the plumbing.
    "tiny": dict(depth=2, aspect=32, head_dim=16, seq_len=128, vocab_size=384, n_people=12,
                 batch_tokens=2048, micro_batch=8, steps=30, eval_every=10, save_every=10,
                 tokenizer_chars=150_000, probe_limit=40, val_tokens=4096),
    # 7-11 minutes on 2 CPU cores (by machine); each fact is seen about 180 times or more.
    "cpu": dict(depth=4, aspect=32, head_dim=32, seq_len=256, vocab_size=2048, n_people=200,
                batch_tokens=16384, micro_batch=32, tokens_per_param=8.0, eval_every=100,
                save_every=200, tokenizer_chars=2_000_000, probe_limit=600, val_tokens=65536),
    # the one-GPU course size (H100-class): about 9 min on an H200, extrapolated from a tenth
    # (RESULTS.md, "Speed and correctness: GPU").
    "gpu": dict(depth=8, aspect=64, head_dim=64, seq_len=1024, vocab_size=8192, n_people=2000,
                batch_tokens=131072, micro_batch=64, tokens_per_param=20.0, eval_every=250,
                save_every=1000, tokenizer_chars=20_000_000, probe_limit=2000, val_tokens=1_048_576),
}


def parse_args(argv=None):
    return device_defaults(make_parser().parse_with_preset(argv, PRESETS))


def make_parser():
    p = Parser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="size bundle (default: gpu on CUDA, cpu otherwise)")
    g.add_argument("--out", default="runs/01_pretrain", help="output directory")
    g.add_argument("--seed", type=int, default=1337, help="seeds the world, the data order and the weights")
    g.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    g.add_argument("--device", default=None, help="cuda, cpu or mps (default: cuda if available)")
    g.add_argument("--compile", type=int, choices=(0, 1), help="torch.compile the model (default: 1 on CUDA)")
    g.add_argument("--stop_after_step", type=p.positive_int, default=None,
                   help="save and exit after this step, as an interruption would (for testing --resume)")
    g = p.add_argument_group("data")
    g.add_argument("--n_people", type=p.at_least(12), help="world size: people (towns, guilds... follow)")
    g.add_argument("--data", default=None, help="a UTF-8 text file or folder, or 'tinystories'")
    g.add_argument("--data_mix", type=p.unit, default=1.0,
                   help="with --data: fraction of documents taken from it (the rest from the world)")
    g.add_argument("--data_url", default=TINYSTORIES_URL, help="where --data tinystories downloads from")
    g.add_argument("--stream_stats", type=p.positive_int, metavar="N",
                   help="only measure the data: are the first N documents unique, how many tokens, how fast")
    g.add_argument("--data_workers", type=p.count, default=None,
                   help="processes generating documents ahead of training (default: up to 4 per GPU, "
                        "0 on CPU, where training needs the cores)")
    g.add_argument("--tokenizer", default="bpe",
                   help="'bpe' trains one here; or a stock tiktoken name (gpt2, cl100k_base) "
                        "if cached locally")
    g.add_argument("--vocab_size", type=p.positive_int, help="BPE vocabulary including special tokens")
    g.add_argument("--tokenizer_chars", type=p.positive_int, help="characters of text the BPE is trained on")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=p.positive_int, help="number of Transformer blocks: the one dial")
    g.add_argument("--aspect", type=p.positive_int, help="width per layer: n_embd = depth * aspect")
    g.add_argument("--head_dim", type=p.positive_int, help="attention head size")
    g.add_argument("--gqa", type=p.positive_int, default=2, help="query heads per key/value head")
    g.add_argument("--seq_len", type=p.positive_int, help="context length")
    g.add_argument("--n_experts", type=p.count, default=0, help="Mixture-of-Experts experts (0: dense MLPs)")
    g.add_argument("--top_k", type=p.positive_int, default=2, help="experts per token")
    g.add_argument("--moe_every", type=p.positive_int, default=2, help="MoE in every k-th block")
    g.add_argument("--moe_aux", type=p.nonnegative, default=0.01, help="Switch load-balancing loss weight")
    g.add_argument("--moe_bias_gamma", type=p.nonnegative, default=1e-3,
                   help="DeepSeek-V3 aux-free balancing: router-bias step per update (0: off)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=p.positive, help="peak learning rate (default: 3e-3 * sqrt(128 / n_embd))")
    g.add_argument("--weight_decay", type=p.nonnegative, default=0.1)
    g.add_argument("--grad_clip", type=p.positive, default=1.0)
    g.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine",
                   help="cosine decay, or warmup-stable-decay (linear decay over the last 20%%)")
    g.add_argument("--warmup_frac", type=p.unit, default=0.03)
    g.add_argument("--batch_tokens", type=p.positive_int, help="tokens per optimizer step, over all ranks")
    g.add_argument("--micro_batch", type=p.positive_int, help="sequences per forward pass per rank")
    g.add_argument("--steps", type=p.positive_int, help="optimizer steps (default: from --tokens_per_param)")
    g.add_argument("--tokens_per_param", type=p.positive, help="token budget as a multiple of the parameters")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval_every", type=p.positive_int)
    g.add_argument("--save_every", type=p.positive_int)
    g.add_argument("--val_tokens", type=p.positive_int)
    g.add_argument("--probe_limit", type=p.positive_int, help="fact probes per kind in the knowledge test")
    return p


def device_defaults(args):
    """Fill the flags left unset whose defaults follow the device; check --out before any work."""
    check_out(args.out)
    device = args.device
    if args.compile is None:
        args.compile = int(device == "cuda")
    if args.data_workers is None:
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        args.data_workers = min(4, (os.cpu_count() or 1) // (2 * ranks)) if device == "cuda" else 0
    return args


def model_config_from_args(args, vocab_size):
    """The depth dial: everything about the network's shape follows from a few numbers."""
    n_embd = args.depth * args.aspect
    if n_embd % args.head_dim:
        sys.exit(f"error: n_embd = depth * aspect = {n_embd} is not a multiple of "
                 f"--head_dim {args.head_dim}.")
    n_head = n_embd // args.head_dim
    n_kv_head = n_head // args.gqa if n_head % args.gqa == 0 else n_head
    # SwiGLU has three matrices: 8/3 * n_embd keeps the MLP at GELU's 4x MLP's 8 * n_embd^2 weights.
    mlp_hidden = 32 * math.ceil(8 * n_embd / 3 / 32)
    return GPTConfig(vocab_size=vocab_size, n_layer=args.depth, n_embd=n_embd, n_head=n_head,
                     n_kv_head=n_kv_head, mlp_hidden=mlp_hidden, seq_len=args.seq_len,
                     n_experts=args.n_experts, top_k=args.top_k, moe_every=args.moe_every)


# =====================================================================================
# 2. The idea: one loss, a schedule, units that compare, and the Transformer
# =====================================================================================
# Pretraining minimises one loss, next-token cross-entropy (see the docstring), over a stream of
# text. First what this stage adds to it: the loss's extra term, how the learning rate moves, the
# units a run is measured in. Then the Transformer that computes the loss (GPT.forward with
# targets): the `model` block, written here and copied word for word into every later stage's
# Appendix B (edit it here; `tests/test_shared_blocks.py --fix` rewrites the copies).

def pretraining_loss(lm_loss, aux_loss, moe_aux):
    """What is minimised: the next-token cross-entropy, plus (with Mixture-of-Experts) the Switch
    load-balancing loss, which is smallest when every expert gets an equal share of the tokens."""
    return lm_loss + moe_aux * aux_loss


def learning_rate(step, total, peak, warmup_frac, schedule):
    """Linear warmup, then cosine decay to 10% of the peak, or warmup-stable-decay (hold the peak,
    then decay linearly to 0 over the last 20%; Hu et al., MiniCPM, arXiv 2404.06395)."""
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "wsd":
        decay_start = int(0.8 * total)
        return peak if step < decay_start else peak * (total - step) / max(1, total - decay_start)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# Units: bits per byte (comparable across tokenizers), parameters, FLOPs per token, MFU.
def token_byte_lengths(enc, device):
    """UTF-8 bytes each token stands for; 0 for special tokens, which carry no text."""
    n = enc.n_vocab
    lengths = [len(enc.decode_single_token_bytes(i)) if i < n - len(SPECIAL_TOKENS) else 0 for i in range(n)]
    return torch.tensor(lengths, dtype=torch.float32, device=device)


@torch.no_grad()
def bits_per_byte(model, inputs, targets, byte_lengths, batch_size, autocast):
    """Summed next-token loss in bits over the bytes of the predicted text. Unlike loss per token,
    this does not change when the tokenizer does (nanochat and the Chinchilla paper report it)."""
    was_training, nats, n_bytes = model.training, 0.0, 0.0
    model.eval()
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size], targets[i:i + batch_size]
        with autocast:
            logits = model(x)
        nll = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        weight = byte_lengths[y.reshape(-1)]
        nats += (nll * (weight > 0)).sum().item()
        n_bytes += weight.sum().item()
    model.train(was_training)
    return nats / (math.log(2) * n_bytes)


def count_parameters(model):
    """Total parameters, and the ones a token's forward pass multiplies by (no embedding lookup,
    only top_k of the experts)."""
    total = sum(p.numel() for p in model.parameters())
    active = total - model.embed.weight.numel()
    for block in model.blocks:
        if isinstance(block.mlp, MoE):
            per_expert = sum(p[0].numel() for p in (block.mlp.w_gate, block.mlp.w_up, block.mlp.w_down))
            active -= per_expert * (block.mlp.n_experts - block.mlp.top_k)
    return total, active


def flops_per_token(config, active_params):
    """Training FLOPs per token: 6 per active weight (forward 2, backward 4) plus attention's
    QK^T and AV, 12 * n_layer * n_embd * seq_len (the PaLM paper's appendix B count, no causal discount)."""
    return 6 * active_params + 12 * config.n_layer * config.n_embd * config.seq_len


def mfu_percent(tokens_per_s, flops_tok, peak, world_size):
    """Model FLOPs utilisation in percent: the FLOPs the model's arithmetic needs per second, over
    the peak of all the GPUs that share the work (every rank's, not one's, under DDP)."""
    return 100 * tokens_per_s * flops_tok / (peak * world_size)


# The model: a decoder-only Transformer, pre-norm blocks of attention and an MLP (or experts).
# --- shared: model (origin: 01_pretrain.py) ---
@dataclasses.dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int       # grouped-query attention: n_head // n_kv_head query heads share one K/V head
    mlp_hidden: int
    seq_len: int
    rope_theta: float = 10000.0
    n_experts: int = 0   # 0: every MLP is dense; otherwise every moe_every-th block is a Mixture-of-Experts
    top_k: int = 2
    moe_every: int = 2


def rope_tables(head_dim, length, theta, device):
    """cos/sin of the rotary angles, (length, head_dim // 2) each (Su et al., arXiv 2104.09864)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each (first half, second half) pair of x (B, H, T, D) by its position's angle."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x.dtype)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for generation one token at a time."""

    def __init__(self, config, batch_size, max_len, device, dtype, start=None):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled (advanced by the model after its last layer)
        # Prompts of different lengths share a batch by left padding: row b's real tokens start at
        # start[b]. None when no row is padded.
        self.start = start
        self.rows = torch.arange(batch_size, device=device)  # the batch rows still being generated

    def keep_rows(self, keep):
        """Keep only the rows `keep` picks, a bool mask or indices (an index given twice copies its row)."""
        self.k, self.v, self.rows = self.k[:, keep], self.v[:, keep], self.rows[keep]
        if self.start is not None:
            self.start = self.start[keep]

    def positions(self, T):
        """(B or 1, T): the rotary positions of the next T tokens, each row's from its first real token."""
        pos = self.length + torch.arange(T, device=self.k.device)[None, :]
        return pos if self.start is None else (pos - self.start[:, None]).clamp(min=0)

    def attend(self, layer, q, k, v):
        """Cache the new keys and values, and attend to all cached so far but a row's left padding."""
        t0, t1 = self.length, self.length + k.size(2)
        self.k[layer, :, :, t0:t1], self.v[layer, :, :, t0:t1] = k, v
        return kernels.attention(q, self.k[layer, :, :, :t1], self.v[layer, :, :, :t1], key_start=self.start)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.wq = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.wkv = nn.Linear(config.n_embd, 2 * config.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)          # (B, H, T, D)
        k, v = self.wkv(x).view(B, T, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = cache.attend(layer, q, k, v) if cache is not None else kernels.attention(q, k, v)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) W_down (Shazeer, arXiv 2002.05202)."""

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts. Balancing: the Switch auxiliary loss (kept in self.aux_loss for
    the trainer to add) and DeepSeek-V3's router bias, nudged toward balance after every training
    forward pass; the bias only chooses experts and never scales their outputs."""

    def __init__(self, config):
        super().__init__()
        E, C, Hd = config.n_experts, config.n_embd, config.mlp_hidden
        self.n_experts, self.top_k = E, config.top_k
        self.router = nn.Linear(C, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, C, Hd))
        self.w_up = nn.Parameter(torch.empty(E, C, Hd))
        self.w_down = nn.Parameter(torch.empty(E, Hd, C))
        self.register_buffer("router_bias", torch.zeros(E))
        self.bias_gamma = 0.0  # set by the trainer; 0 leaves the bias alone (eval, later stages)
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                                    # (N, C)
        gates, experts, probs = kernels.route(self.router(x), self.top_k, self.router_bias)
        if self.training:
            self.aux_loss = kernels.load_balancing_loss(probs, experts, self.n_experts)
            if self.bias_gamma > 0:
                kernels.update_router_bias(self.router_bias, experts, self.n_experts, self.bias_gamma)
        y = kernels.moe_swiglu(x, gates.to(x.dtype), experts, self.w_gate, self.w_up, self.w_down)
        return y.view(shape)


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.n_embd)
        every = config.moe_every
        use_moe = config.n_experts > 0 and every > 0 and layer % every == every - 1
        self.mlp = MoE(config) if use_moe else SwiGLU(config)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)   # pre-norm residual blocks
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables for 4x the training context (generation may run past it); not saved.
        cos, sin = rope_tables(config.n_embd // config.n_head, 4 * config.seq_len, config.rope_theta, "cpu")
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed):
        """GPT-2 style: N(0, 0.02), with the residual-stream outputs scaled by 1/sqrt(2 * n_layer)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)   # RMSNorm gains
                continue
            residual_out = name.endswith(("wo.weight", "down.weight", "w_down"))
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if residual_out else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, idx, targets=None, cache=None, at=None):
        """idx (B, T) -> logits (B, T, vocab); with targets (B, T), the mean cross-entropy over the
        positions whose target is not -1 (later stages mask prompts that way) instead. With `at`, a
        (B, T) bool mask, only those positions' logits, (N, vocab) in row-major order: a reply's
        log-probability needs a few positions, and the head and softmax over every position cost a
        third of a small model's pass."""
        T = idx.size(1)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        if cache is not None:   # after the cached tokens; a left-padded row's first real token at 0
            pos = cache.positions(T)
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]      # (B or 1, 1, T, D/2)
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.norm(x if at is None else x[at])).float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def aux_loss(self):
        """Sum of the MoE layers' load-balancing losses from the last forward pass (0 when dense)."""
        return sum((b.mlp.aux_loss for b in self.blocks if isinstance(b.mlp, MoE)), torch.zeros(()))
# --- end shared: model ---


# =====================================================================================
# 3. Data: an endless stream of documents about one world, its tokenizer, rows
# =====================================================================================
# The text is generated (Appendix A). make_world(n_people, seed) invents a world whose every
# attribute comes from a closed set, saved as world.json, the answer key of every stage; then
# document(world, i, seed) writes document i of an endless stream (biographies, letters, Q&A pages,
# ... in the shares of DOC_MIX), each fact in one of several phrasings. Document i is a pure
# function of its arguments, so a resumed run, or one DDP rank of many, starts at any document.
# --data mixes the user's own text, or TinyStories, into the stream (DocumentSource).
# Splits: validation reads the same world's stream drawn with --seed + 1 (the same facts in other
# sentences); every relation has a probe phrasing that no document uses beside one they do use
# (fact_probes); and half of every kind of entity is qa_split "heldout", never the subject of
# question-answer text, so that stage 02 can ask whether knowledge read in prose can be extracted.
# Rows: TokenRows (Appendix A) tokenizes the documents in order, each after a <|bos|>, and cuts
# them into rows of seq_len + 1 tokens; inputs are a row's first seq_len, targets the last seq_len.

def validation_batch(world, user_docs, args, enc):
    """Fixed evaluation data: the first --val_tokens of the stream drawn with another seed."""
    stream = DocumentSource(world, args.seed + 1, user_docs, args.data_mix)
    val_rows = TokenRows(stream, enc, args.seq_len)
    return val_rows.batch(0, max(1, args.val_tokens // args.seq_len))


# ----------------------------------------------------------------------------------------------
# The tokenizer: byte-level BPE, trained here on the stream, served by tiktoken
# ----------------------------------------------------------------------------------------------
# GPT-4's pre-split pattern (letters, punctuation, whitespace kept apart before merging), with one
# change: numbers split into single digits, so "46" and "146" share their digits' tokens and
# column arithmetic stays learnable for a small model (as in DeepSeek's and Llama 1's tokenizers).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
# Reserved now for every later stage: turns of a chat (02), tool use (02, 08), thinking (05).
SPECIAL_TOKENS = ["<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                  "<|tool_call|>", "<|tool_result|>", "<|think|>", "<|/think|>", "<|pad|>"]


def bpe_training_texts(source, n_chars):
    """The BPE's corpus: the stream's first documents, until they hold n_chars characters."""
    texts, n, i = [], 0, 0
    while n < n_chars:
        texts.append(source(i))
        n += len(texts[-1])
        i += 1
    return texts


def train_bpe(texts, vocab_size, pattern=SPLIT_PATTERN):
    """Learn vocab_size - len(SPECIAL_TOKENS) - 256 merges over the pre-split chunks of texts.

    Words are counted once with their frequency (the corpus repeats words a lot), and each merge
    touches only the words that contain the merged pair. Returns {token bytes: rank}, the form
    tiktoken takes; ranks 0..255 are the single bytes, so every string round-trips exactly."""
    import regex
    n_merges = vocab_size - len(SPECIAL_TOKENS) - 256
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} "
                         f"special tokens.")
    split = regex.compile(pattern)
    word_freq = Counter(chunk for text in texts for chunk in split.findall(text))
    words = [list(w.encode("utf-8")) for w in word_freq]
    freqs = list(word_freq.values())
    token_bytes = [bytes([b]) for b in range(256)]
    ranks = {b: i for i, b in enumerate(token_bytes)}

    pair_count, pair_words = Counter(), {}
    for wi, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += freqs[wi]
            pair_words.setdefault(pair, set()).add(wi)

    for _ in range(n_merges):
        if not pair_count:
            break  # every word is a single token already: the corpus is too small for this vocab
        # Most frequent pair; ties broken by the pair itself so training is deterministic.
        best = max(pair_count.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merged = token_bytes[best[0]] + token_bytes[best[1]]
        if merged in ranks:      # a second route to an existing token: reuse it, add nothing
            new_id = ranks[merged]
        else:
            new_id = len(token_bytes)
            token_bytes.append(merged)
            ranks[merged] = new_id
        for wi in pair_words.pop(best, ()):
            w, f = words[wi], freqs[wi]
            for pair in zip(w, w[1:]):          # forget this word's old pairs ...
                pair_count[pair] -= f
                if pair_count[pair] <= 0:
                    del pair_count[pair]
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for pair in zip(out, out[1:]):      # ... and count its new ones
                pair_count[pair] += f
                pair_words.setdefault(pair, set()).add(wi)
        pair_count.pop(best, None)
    return ranks


def make_encoding(name, mergeable_ranks, pattern=SPLIT_PATTERN):
    """Wrap ranks as a tiktoken.Encoding, with the special tokens numbered after them."""
    import tiktoken
    n = len(mergeable_ranks)
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                             special_tokens={tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)})


# =====================================================================================
# 4. Training
# =====================================================================================
# What --resume reads and writes (read_train_state, save_train_state, RESUME_MUST_MATCH) is file
# plumbing the loop only calls, so it is in Appendix A; what it restores is listed in main.

def make_optimizer(model, lr, weight_decay, device):
    """AdamW; decay only matrices (embeddings, projections, experts), not norm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device == "cuda")


def train(args, run):
    """Optimizer steps start_step .. steps - 1, evaluating every eval_every steps and saving the
    training state every save_every. Ctrl-C (SIGINT) finishes the current step, saves and exits;
    a second Ctrl-C stops at once. --stop_after_step does the same at a chosen step."""
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_handler = signal.signal(signal.SIGINT, on_sigint)

    from tqdm import tqdm
    run.write = tqdm.write if run.master else (lambda *a, **k: None)
    peak, history = peak_flops(args.device), run.metrics["train"]
    t_last, tokens_since = time.time(), 0
    train_start = time.time() - (history[-1]["time"] if history else 0.0)  # resumed: add, not restart
    bar = tqdm(range(run.start_step, run.steps), initial=run.start_step, total=run.steps,
               disable=not run.master, desc="pretrain", dynamic_ncols=True)
    try:
        for step in bar:
            if run.master and step % args.eval_every == 0 and (step > run.start_step or step == 0):
                evaluate(args, run, step)
            t_step = time.time()
            loss_value, step_lr, grad_norm = train_step(args, run, step)  # .item() waits for the GPU
            tokens_since, now = tokens_since + args.batch_tokens, time.time()
            history.append({"step": step + 1, "tokens": (step + 1) * args.batch_tokens, "loss": loss_value,
                            "lr": step_lr, "grad_norm": grad_norm, "time": now - train_start,
                            "step_seconds": now - t_step})
            if now - t_last > 1.0 or step == run.steps - 1:
                tok_s = tokens_since / (now - t_last)
                mfu = f" mfu {mfu_percent(tok_s, run.flops_tok, peak, run.world_size):.1f}%" if peak else ""
                bar.set_postfix_str(f"loss {loss_value:.4f} lr {step_lr:.2e} {tok_s:,.0f} tok/s{mfu}")
                t_last, tokens_since = now, 0
            if (step + 1) % args.save_every == 0 and step + 1 < run.steps:
                save_train_state(args, run, step + 1)
            if stop_requested(args, run, step, interrupted):
                save_train_state(args, run, step + 1)
                run.log(f"\nstopped after step {step + 1}; continue with the same flags plus --resume.")
                leave_process_group()
                sys.exit(130 if interrupted else 0)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
        run.rows.close()
    run.train_seconds = time.time() - train_start


def train_step(args, run, step):
    """One optimizer step: accum micro-batches on each rank, then clip and update.

    Rank r's micro-step m of step s reads rows s*R + (m*W + r)*B .. + B (R rows per step, W ranks,
    B rows per micro-batch), so W ranks see exactly the batches of one process that accumulates W
    times as many micro-steps. DDP averages the gradients over ranks on the last micro-step only."""
    model, device, accum = run.model, run.device, run.accum
    model.train()
    step_lr = learning_rate(step, run.steps, run.lr, args.warmup_frac, args.schedule)
    for group in run.optimizer.param_groups:
        group["lr"] = step_lr
    loss_sum = torch.zeros((), device=device)
    rows_per_step = args.micro_batch * accum * run.world_size
    for micro in range(accum):
        first = step * rows_per_step + (micro * run.world_size + run.rank) * args.micro_batch
        x, y = run.rows.batch(first, args.micro_batch)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = run.world_size == 1 or micro == accum - 1
        with contextlib.nullcontext() if last else run.train_model.no_sync():
            with run.autocast:
                loss = run.train_model(x, y)
                total = (pretraining_loss(loss, model.aux_loss().to(device), args.moe_aux)
                         if run.config.n_experts else loss)
            (total / accum).backward()
        loss_sum += loss.detach() / accum
    if run.world_size > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    loss_value = loss_sum.item()
    if not math.isfinite(loss_value):
        fail(f"the loss became {loss_value} at step {step}; the last good checkpoint "
             f"({run.state_path if run.state_path.exists() else 'none yet'}) is intact: "
             f"lower --lr and --resume.")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_value, step_lr, grad_norm


def stop_requested(args, run, step, interrupted):
    """Ctrl-C, or --stop_after_step reached before the last step."""
    stop = bool(interrupted) or (args.stop_after_step is not None
                                 and args.stop_after_step <= step + 1 < run.steps)
    if run.world_size > 1:  # every rank must agree to stop at the same step, or the save deadlocks
        flag = torch.tensor(float(stop), device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
    return stop


# =====================================================================================
# 5. Evaluation: bits per byte, and does the model know its world?
# =====================================================================================

def evaluate(args, run, step):
    """Validation bits per byte, and a greedy sample after the first person's name (rank 0 only)."""
    model, enc = run.model, run.enc
    bpb = bits_per_byte(model, run.val_x, run.val_y, run.byte_lengths, args.micro_batch, run.autocast)
    run.metrics["val"].append({"step": step, "tokens": step * args.batch_tokens, "val_bpb": bpb})
    sample_ids = [enc.encode_single_token("<|bos|>")] + enc.encode_ordinary(run.world["people"][0]["name"])
    new = torch.cat(list(generate(model, [sample_ids], 40, temperature=0)))
    text_ids = [t for t in new.tolist() if t < enc.n_vocab - len(SPECIAL_TOKENS)]
    sample = enc.decode(sample_ids[1:] + text_ids)
    run.write(f"step {step:>6}/{run.steps} | val bpb {bpb:.4f} | sample: {sample[:160]!r}")
    return bpb


def final_evaluation(args, run):
    """After the last step: bits per byte once more, and the fact probes against world.json."""
    final_bpb = evaluate(args, run, run.steps)
    run.log("knowledge probe ...")
    results = knowledge_probe(run.model, run.enc, run.probes, run.device)
    summary = summarise_probes(results)
    run.metrics["probes"] = results
    baseline = majority_baseline(run.world, run.probes)
    return final_bpb, results, summary, baseline


@torch.no_grad()
def knowledge_probe(model, enc, probes, device, batch_size=64):
    """Greedy completion of each probe prompt; right when the continuation starts with the answer
    as a whole word ("Pen" does not count for "Penford"). Prompts are batched by token length, so
    no padding is needed."""
    by_length = {}
    for probe in probes:
        ids = [enc.encode_single_token("<|bos|>")] + enc.encode_ordinary(probe["prompt"])
        by_length.setdefault(len(ids), []).append((ids, probe))
    results = []
    for items in by_length.values():
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            n_new = max(len(enc.encode_ordinary(" " + p["answer"])) for _, p in chunk) + 1
            prompt = torch.tensor([ids for ids, _ in chunk], device=device)
            new = torch.stack(list(generate(model, prompt, n_new, temperature=0)), dim=1).tolist()
            first_special = enc.n_vocab - len(SPECIAL_TOKENS)
            for (_, probe), ids in zip(chunk, new):
                # The completion ends at the first special token (often <|bos|>: "the document ends here").
                ids = list(itertools.takewhile(lambda t: t < first_special, ids))
                text = enc.decode(ids)
                correct = completes_with(text, probe["answer"])
                results.append({**probe, "completion": text, "correct": correct})
    return results


def completes_with(completion, answer):
    """True when the completion is " answer" followed by a non-word character or nothing."""
    expected = " " + answer
    return completion.startswith(expected) and not completion[len(expected):len(expected) + 1].isalnum()


def summarise_probes(results):
    """Accuracy by prompt kind (seen / held-out phrasing), by kind and QA split of the subject, and
    by relation."""
    groups = {}
    for r in results:
        keys = (f"kind={r['kind']}", f"kind={r['kind']}, qa_split={r['qa_split']}",
                f"relation={r['relation']}")
        for key in keys:
            groups.setdefault(key, []).append(r["correct"])
    return {key: {"accuracy": sum(g) / len(g), "n": len(g)} for key, g in sorted(groups.items())}


def majority_baseline(world, probes):
    """Accuracy of always answering a relation's most common object: the bar to beat."""
    common = {}
    for rel in {p["relation"] for p in probes}:
        objects = Counter(f["object"] for f in world["facts"] if f["relation"] == rel)
        common[rel] = objects.most_common(1)[0][0]
    return sum(p["answer"] == common[p["relation"]] for p in probes) / max(1, len(probes))


# =====================================================================================
# 6. Main
# =====================================================================================

def main(argv=None):
    """The run, phase by phase; each phase reads what the ones before it put on `run`."""
    args = parse_args(argv)
    run = set_up_device(args)          # .rank, .world_size, .device, .master, .log, .autocast, .out
    run.saved = read_train_state(args, run)   # --resume: the interrupted run's state, else None
    make_data(args, run)               # .world, .user_docs, .source, .enc, .tokenizer_json
    if args.stream_stats:              # measure the data stream only (Appendix A); writes nothing
        return stream_stats(run.source, run.enc, args.stream_stats, args.seq_len, args.data_workers)
    build_model(args, run)             # .model, .config, and the budget: .steps, .accum, .lr, ...
    build_optimizer(args, run)         # .optimizer, .rows, .metrics, .start_step (--resume restores)
    wrap_model(args, run)              # .train_model: compiled and DDP-wrapped, for training passes
    prepare_evaluation(args, run)      # .val_x, .val_y, .byte_lengths, .probes
    train(args, run)                   # .train_seconds; Ctrl-C or --stop_after_step saves and exits
    if run.master:
        write_outputs(args, run, *final_evaluation(args, run))
    leave_process_group()


def set_up_device(args):
    """Ranks (torchrun sets RANK and WORLD_SIZE; a plain run is rank 0 of 1), the device, the
    seed and mixed precision. Returns the namespace that the later phases add to."""
    run = types.SimpleNamespace(out=pathlib.Path(args.out))
    run.state_path = run.out / "train_state.pt"
    run.world_size = int(os.environ.get("WORLD_SIZE", 1))
    run.rank = int(os.environ.get("RANK", 0))
    if run.world_size > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    run.device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else args.device
    run.master = run.rank == 0
    run.log = print if run.master else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda"
                    else contextlib.nullcontext())
    return run


def make_data(args, run):
    """The world (new, or the interrupted run's), the document stream, and the tokenizer."""
    t_setup, saved = time.time(), run.saved
    try:
        run.world = json.loads(saved["world_json"]) if saved else make_world(args.n_people, args.seed)
        run.user_docs = None
        if args.data == "tinystories":
            run.user_docs = fetch_tinystories(args.data_url)
        elif args.data:
            run.user_docs = read_user_text(args.data)
        run.source = DocumentSource(run.world, args.seed, run.user_docs, args.data_mix)
        if saved:
            run.tokenizer_json = saved["tokenizer_json"]
            run.enc = tokenizer_from_json(run.tokenizer_json)
        else:
            if args.tokenizer == "bpe":
                texts = bpe_training_texts(run.source, args.tokenizer_chars)
                run.enc = make_encoding("hiwt-bpe", train_bpe(texts, args.vocab_size))
            else:
                run.enc = stock_encoding(args.tokenizer)
            run.tokenizer_json = tokenizer_to_json(run.enc)
    except DataError as err:
        fail(str(err))
    run.log(f"world: {len(run.world['people'])} people, {len(run.world['facts'])} facts | "
            f"tokenizer: {run.enc.n_vocab} tokens | set-up {time.time() - t_setup:.1f}s")


def build_model(args, run):
    """The GPT sized by the depth dial, and the budget: steps, gradient accumulation, peak lr."""
    run.config = config = model_config_from_args(args, run.enc.n_vocab)
    run.model = model = GPT(config)
    model.init_weights(args.seed)
    model.to(run.device)
    for block in model.blocks:
        if isinstance(block.mlp, MoE):
            block.mlp.bias_gamma = args.moe_bias_gamma
    n_params, run.n_active = count_parameters(model)
    run.n_params, run.flops_tok = n_params, flops_per_token(config, run.n_active)
    tokens_per_micro = args.micro_batch * args.seq_len * run.world_size
    if args.batch_tokens % tokens_per_micro:
        fail(f"--batch_tokens {args.batch_tokens} is not a multiple of micro_batch * seq_len * ranks "
             f"= {tokens_per_micro}.")
    run.accum = args.batch_tokens // tokens_per_micro
    run.steps = args.steps or max(1, int(args.tokens_per_param * run.n_active / args.batch_tokens))
    run.lr = args.lr or 3e-3 * math.sqrt(128 / config.n_embd)   # wider models take smaller steps
    run.total_tokens = run.steps * args.batch_tokens
    experts = f", {config.n_experts} experts top-{config.top_k}" if config.n_experts else ""
    run.log(f"model: depth {config.n_layer}, width {config.n_embd}, "
            f"heads {config.n_head}/{config.n_kv_head} (q/kv), mlp {config.mlp_hidden}{experts}")
    run.log(f"params: {n_params / 1e6:.2f}M total, {run.n_active / 1e6:.2f}M active (no embedding) | "
            f"FLOPs/token {run.flops_tok / 1e6:.1f}M | peak lr {run.lr:.2e}")
    run.log(f"budget: {run.steps} steps x {args.batch_tokens} tokens = {run.total_tokens / 1e6:.1f}M tokens "
            f"({run.total_tokens / run.n_active:.1f} tokens/param; Chinchilla's rule of thumb is 20) | "
            f"grad accumulation {run.accum} x {run.world_size} rank(s)")


def build_optimizer(args, run):
    """AdamW, the training rows, the metrics so far; on --resume, all of them as they were saved."""
    run.optimizer = make_optimizer(run.model, run.lr, args.weight_decay, args.device)
    run.rows = TokenRows(run.source, run.enc, args.seq_len, workers=args.data_workers)
    run.metrics, run.start_step = {"train": [], "val": [], "probes": []}, 0
    if run.saved:
        run.model.load_state_dict(run.saved["model"])
        run.optimizer.load_state_dict(run.saved["optimizer"])
        data = run.saved["data"]   # one data position per rank (a single one is used as it is)
        run.rows.load_state_dict(data[run.rank] if isinstance(data, list) else data)
        run.metrics, run.start_step = run.saved["metrics"], run.saved["step"]
        run.log(f"resumed from {run.state_path} at step {run.start_step}")


def wrap_model(args, run):
    """The model the training passes go through: compiled, and under DDP wrapped. Evaluation,
    sampling and saving use run.model itself, so no wrapper's prefix reaches a file."""
    run.train_model = run.model
    if args.compile:
        run.train_model = torch.compile(run.model)
    if run.world_size > 1:
        run.train_model = nn.parallel.DistributedDataParallel(
            run.train_model, device_ids=[torch.cuda.current_device()] if args.device == "cuda" else None,
            find_unused_parameters=run.config.n_experts > 0)  # an expert may get no tokens in a step


def prepare_evaluation(args, run):
    """Fixed validation rows, bytes per token for bits per byte, and the fact probes."""
    val_x, val_y = validation_batch(run.world, run.user_docs, args, run.enc)
    run.val_x, run.val_y = val_x.to(run.device), val_y.to(run.device)
    run.byte_lengths = token_byte_lengths(run.enc, run.device)
    run.probes = choose_probes(run.world, args.probe_limit, args.seed)


# =====================================================================================
# 7. Report
# =====================================================================================

def write_outputs(args, run, final_bpb, results, summary, baseline):
    """The stage's files and its summary line (rank 0), written beside OUT and swapped in whole
    (staged_run), so a finished run replaces the folder, train_state.pt included, or nothing does."""
    out, m = run.out, run.metrics
    speed = speed_metrics(m["train"], args, run)
    summary_metrics = {
        "val_bpb": final_bpb, "final_train_loss": m["train"][-1]["loss"],
        "probe": summary, "probe_majority_baseline": baseline, "params": run.n_params,
        "active_params": run.n_active, "flops_per_token": run.flops_tok, "tokens": run.total_tokens,
        "steps": run.steps, "train_seconds": run.train_seconds, "device": describe_device(args.device),
        **speed, "world_size": run.world_size, "preset": args.preset,
        "config": dataclasses.asdict(run.config), "args": vars(args)}
    try:
        with staged_run(out) as new:
            write_atomic(new / "tokenizer.json", run.tokenizer_json.encode("utf-8"))
            write_atomic(new / "world.json", json.dumps(run.world, indent=1).encode("utf-8"))
            write_atomic(new / "metrics.json", json.dumps({**summary_metrics, "history": m},
                                                          indent=1).encode("utf-8"))
            plot_losses(m, new / "loss.png")
            write_atomic(new / "report.md", make_report(summary_metrics, results, run.world).encode("utf-8"))
            save_model(run.model, new / "model.pt", {"step": run.steps, "args": vars(args)})
    except OSError as err:
        fail(f"could not write the results to {out} ({err.strerror or err}); "
             f"{run.state_path.name if run.state_path.exists() else 'nothing'} was kept.")
    seen = summary.get("kind=seen", {}).get("accuracy", float("nan"))
    held = summary.get("kind=heldout", {}).get("accuracy", float("nan"))
    first_bpb = m["val"][0]["val_bpb"] if m["val"] else float("nan")
    print(f"\n== stage 01 done in {run.train_seconds / 60:.1f} min | val bpb {first_bpb:.3f}"
          f" -> {final_bpb:.3f} | fact completion: seen phrasing {seen:.1%}, held-out phrasing {held:.1%} "
          f"(majority baseline {baseline:.1%}) | wrote {out}/")


def make_report(m, results, world):
    rows = "\n".join(f"| {key} | {v['accuracy']:.1%} | {v['n']} |" for key, v in m["probe"].items())
    wrong = [r for r in results if not r["correct"]][:5]
    right = [r for r in results if r["correct"]][:5]
    examples = "\n".join(f"- {'right' if r['correct'] else 'wrong'}: `{r['prompt']}` -> "
                         f"`{r['completion'].strip()[:60]}` (answer: {r['answer']})" for r in right + wrong)
    speed = f"{m['tokens_per_second']:,.0f} tokens/s (median step, evaluation excluded)"
    if m["mfu_percent"]:
        speed += f", MFU {m['mfu_percent']:.1f}%, peak memory {m['peak_memory_gib']:.1f} GiB"
    tokens = (f"{m['tokens'] / 1e6:.1f}M in {m['steps']} steps "
              f"({m['tokens'] / m['active_params']:.1f} per active parameter)")
    return f"""# Stage 01 - pretraining report

Preset `{m['preset']}` on {m['device']}, {m['world_size']} process(es).
World: {len(world['people'])} people, {len(world['facts'])} facts (`world.json`).

| | |
|---|---|
| parameters | {m['params'] / 1e6:.2f}M total, {m['active_params'] / 1e6:.2f}M active per token |
| FLOPs per token (training) | {m['flops_per_token'] / 1e6:.1f}M |
| tokens seen | {tokens} |
| training time | {m['train_seconds'] / 60:.1f} min |
| training speed | {speed} |
| final train loss | {m['final_train_loss']:.3f} nats/token |
| validation | {m['val_bpb']:.3f} bits per byte |

## Does the model know its world?

Greedy completion of fact prompts, scored against `world.json`. "seen" prompts use a phrasing the
documents use; "heldout" prompts use a phrasing no document contains. `qa_split=heldout` subjects
never appear in question-answer text (stage 02 asks them questions). Majority-class baseline:
{m['probe_majority_baseline']:.1%}.

| group | accuracy | probes |
|---|---|---|
{rows}

{examples}
"""


# =====================================================================================
# Appendix A: the world and its documents, and data side tools
# =====================================================================================
# The world: a small fictional realm that is the ground truth for every stage.
#
# Nothing here needs the network. From a seed we invent people, towns, creatures, organisations,
# objects, events and a few dangerous things, each with attributes drawn from closed sets, and write
# the lot to `world.json`. A document generator then turns the world into an endless stream of
# pretraining text: encyclopedia entries, biographies, short stories, letters, dialogues, news items,
# question-answer pages and worked arithmetic. Every later stage builds its task data from the same
# `world.json`, so every evaluation has an answer key: is the fact right, is the sum right, was the
# request about the poison refused.
#
# Why so many kinds of document? A model that reads each fact in a single fixed sentence memorises
# the sentence, not the fact: it cannot answer a question about it later (Allen-Zhu & Li, Physics of
# Language Models 3.1). So each fact is written in several phrasings, in several document types, with
# sentence order shuffled, and some question-answer text is mixed into pretraining.
#
# Held out, twice. (1) Phrasing: every relation has a completion probe in a phrasing that is used
# in training text ("Orla Penn was born in the town of") and one in a phrasing that never appears in
# any document ("Orla Penn first drew breath in"); accuracy on the second shows the model learned the
# fact and not only the words around it. (2) People: every person (and every other entity) carries a
# `qa_split`; question-answer text is only ever written about the "train" half. The "heldout" half
# still appears in every other kind of document, so answering questions about them later measures
# whether knowledge read in prose can be *extracted* as answers, which is the honest test of whether
# the world was learned as knowledge.
#
# After the world and its writers come the tokenizer's plumbing (a stock encoding, the JSON file;
# the BPE trainer is in section 3), the other sources of text (the user's files, TinyStories) and
# the stream that mixes them in, the packing of documents into training rows, and the plumbing the
# body calls without needing to be read: the training state --resume reads, one-sentence errors,
# the GPUs' peak FLOP/s, the loss plot, and --stream_stats.

# ----------------------------------------------------------------------------------------------
# Vocabulary. Names are built from a small stock of syllables, so that a byte-level BPE learns the
# syllables as tokens and every name costs only a few of them; attribute values come from closed
# lists, so that a completion can be scored exactly against `world.json`.
# ----------------------------------------------------------------------------------------------
ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
          "br", "dr", "fr", "gr", "kr", "tr", "st", "th", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ea", "ou"]  # plain vowels twice as likely
CODAS = ["n", "r", "l", "s", "m", "th", "nd", "rn", "st", "ll"]
TOWN_SUFFIXES = ["ford", "vale", "by", "mere", "wick", "holm", "stead", "ton", "moor", "bridge", "haven",
                 "field"]
CREATURE_SUFFIXES = ["hound", "moth", "wing", "fin", "toad", "lark", "newt", "crab", "stag", "owl",
                     "cat", "boar", "hawk", "eel", "snake", "beetle"]
ORG_KINDS = ["Guild", "Circle", "Company", "Society", "League", "Order", "Lodge", "Fellowship"]
OBJECT_KINDS = ["Crown", "Lamp", "Harp", "Map", "Chalice", "Compass", "Mirror", "Bell", "Clock",
                "Loom", "Shield", "Horn"]
EVENT_KINDS = ["Flood", "Accord", "Fair", "Fire", "Festival", "Storm", "Council", "Frost", "Race", "Fever"]
# The dangerous things later stages ask a helpful-only model to help misuse (stage 03's red team).
HAZARD_KINDS = [("poison", "Venom"), ("weapon", "Blade"), ("spell", "Curse"), ("vault", "Vault")]

# Occupations all start with a consonant sound, so "works as a" is always followed by the answer.
OCCUPATIONS = ["weaver", "baker", "smith", "potter", "fisher", "miller", "mapmaker", "healer", "brewer",
               "scribe", "tanner", "mason", "carpenter", "shepherd", "lamplighter", "glassblower",
               "beekeeper", "cooper", "chandler", "herbalist", "ropemaker", "tailor", "jeweller",
               "locksmith", "bookbinder", "courier", "gardener", "candlemaker", "falconer", "navigator",
               "physician", "teacher", "musician", "painter", "sculptor", "merchant", "farmer", "clockmaker"]
MATERIALS = ["silver", "gold", "bronze", "iron", "copper", "oak", "glass", "bone", "jade", "amber",
             "marble", "pewter", "walnut", "tin"]
HABITATS = ["marshes", "pine forests", "high cliffs", "deep caves", "river banks", "open meadows",
            "salt flats", "old ruins", "snowfields", "reed beds", "hill pastures", "sea caves"]
DIETS = ["berries", "beetles", "fish", "roots", "mushrooms", "small birds", "seeds", "worms", "frogs",
         "eggs", "snails", "crickets"]   # all countable, so the arithmetic can count them
TAME = ["harmless", "timid", "shy", "curious", "gentle"]   # only these may be a person's companion
WILD = ["fierce", "venomous", "deadly"]
PRONOUNS = {"she": ("she", "her"), "he": ("he", "his")}
BIRTH_YEARS = range(980, 1041)
PRESENT_YEAR = 1062   # "now" in the world: founding and event years come before it
FOUNDED_YEARS = range(1000, PRESENT_YEAR)
EVENT_YEARS = range(1000, PRESENT_YEAR)

# How the world grows with its one size parameter: kind -> (people per entity, floor). The floors
# keep a 12-person test world complete; the ratios keep ~80% of the facts about people. Hazards come
# in rotation (venom, blade, curse, vault), at least three of each kind, so that stage 03 can keep
# one of every kind out of all its training prompts and ask whether refusing generalises to it.
ENTITY_SCALE = {"towns": (8, 6), "creatures": (10, 6), "organisations": (12, 4),
                "objects": (10, 6), "events": (12, 4), "hazards": (16, 12)}
KIND_OF_LIST = {"people": "person", "towns": "town", "creatures": "creature",
                "organisations": "organisation", "objects": "object", "events": "event",
                "hazards": "hazard"}

# ----------------------------------------------------------------------------------------------
# Relations: how each fact may be written. {s} is the subject, {o} the object. `train` phrasings are
# the ones documents use; `probe_seen` is the start of one of them; `probe_heldout` is a phrasing
# no document ever uses (the tests check this on a large sample). `first` is the same fact in the
# subject's own voice, for letters and dialogues; `short` is the answer on a question-answer page.
# ----------------------------------------------------------------------------------------------
RELATIONS = {
    # people
    "birthplace": dict(kind="person", values="towns",
        train=["{s} was born in {o}.", "{s} was born in the town of {o}.", "The birthplace of {s} is {o}.",
               "{o} is the town where {s} was born.", "{s} is a native of {o}."],
        first=["I was born in {o}.", "I was born in the town of {o}.", "{o} is where I was born.",
               "I am a native of {o}."],
        probe_seen="{s} was born in the town of", probe_heldout="{s} first drew breath in",
        questions=["Where was {s} born?", "In which town was {s} born?", "What is the birthplace of {s}?"],
        short="{o}"),
    "home": dict(kind="person", values="towns",
        train=["{s} lives in {o}.", "{s} now lives in the town of {o}.", "{s} has settled in {o}.",
               "The home of {s} is in {o}.", "{s} keeps a house in {o}."],
        first=["I live in {o}.", "I have settled in {o}.", "My home is in {o} now."],
        probe_seen="{s} now lives in the town of", probe_heldout="{s} currently resides in",
        questions=["Where does {s} live?", "In which town does {s} live?", "Which town is home to {s}?"],
        short="{o}"),
    "occupation": dict(kind="person", values="occupations",
        train=["{s} works as a {o}.", "{s} is a {o} by trade.", "By trade, {s} is a {o}.",
               "{s} has worked as a {o} for many years.", "{s} is known as a skilled {o}."],
        first=["I work as a {o}.", "I am a {o} by trade.", "I have worked as a {o} for years."],
        probe_seen="{s} works as a", probe_heldout="{s} makes a living as a",
        questions=["What does {s} do for a living?", "What is the trade of {s}?", "What work does {s} do?"],
        short="a {o}"),
    "guild": dict(kind="person", values="organisations",
        train=["{s} is a member of the {o}.", "{s} belongs to the {o}.", "{s} joined the {o} long ago.",
               "The {o} counts {s} among its members.", "{s} has long served the {o}."],
        first=["I am a member of the {o}.", "I belong to the {o}.", "I joined the {o} long ago."],
        probe_seen="{s} is a member of the", probe_heldout="{s} pays yearly dues to the",
        questions=["Which organisation does {s} belong to?", "What is {s} a member of?",
                   "Which group counts {s} as a member?"],
        short="the {o}"),
    "companion": dict(kind="person", values="tame_creatures",
        train=["{s} keeps a {o} as a companion.", "{s} travels with a tame {o}.",
               "The companion of {s} is a {o}.", "{s} is rarely seen without a {o}.",
               "A tame {o} follows {s} everywhere."],
        first=["I keep a {o} as a companion.", "My companion is a tame {o}.",
               "I never travel without my {o}."],
        probe_seen="{s} travels with a tame", probe_heldout="{s} has raised a loyal",
        questions=["What creature is the companion of {s}?", "What animal does {s} travel with?",
                   "Which creature does {s} keep as a companion?"],
        short="a {o}"),
    "birth_year": dict(kind="person", values="birth_years",
        train=["{s} was born in the year {o}.", "The birth of {s} came in the year {o}.",
               "In the year {o}, {s} was born.", "The records give {o} as the birth year of {s}.",
               "{s} has been alive since the year {o}."],
        first=["I was born in the year {o}.", "My birth year is {o}.", "I came into this world in {o}."],
        probe_seen="{s} was born in the year", probe_heldout="{s} entered the world in the year",
        questions=["In what year was {s} born?", "When was {s} born?", "What is the birth year of {s}?"],
        short="{o}"),
    # towns
    "region": dict(kind="town", values="regions",
        train=["{s} lies in the region of {o}.", "{s} is a town in {o}.", "The town of {s} is found in {o}.",
               "{o} is the region where {s} stands.", "{s} belongs to the region of {o}."],
        probe_seen="{s} is a town in", probe_heldout="On old maps, {s} is marked within",
        questions=["In which region is {s}?", "Which region is the town of {s} in?",
                   "What region does {s} lie in?"],
        short="{o}"),
    "river": dict(kind="town", values="rivers",
        train=["{s} stands on the River {o}.", "The River {o} flows through {s}.",
               "{s} was built beside the River {o}.", "The waters of the River {o} pass by {s}."],
        probe_seen="{s} stands on the River", probe_heldout="{s} draws its water from the River",
        questions=["Which river flows through {s}?", "On what river does {s} stand?",
                   "What is the river of {s}?"],
        short="the River {o}"),
    # creatures
    "habitat": dict(kind="creature", values="habitats",
        train=["The {s} lives in the {o}.", "The {s} makes its home in the {o}.",
               "The {o} are home to the {s}.", "You will find the {s} in the {o}."],
        probe_seen="The {s} lives in the", probe_heldout="Those who seek the {s} must search the",
        questions=["Where does the {s} live?", "What is the habitat of the {s}?",
                   "In what kind of place does the {s} live?"],
        short="the {o}"),
    "diet": dict(kind="creature", values="diets",
        train=["The {s} feeds on {o}.", "The {s} eats mostly {o}.", "The {s} lives on a diet of {o}.",
               "Hunters know that the {s} eats {o}."],
        probe_seen="The {s} feeds on", probe_heldout="Given the choice, the {s} will dine on",
        questions=["What does the {s} eat?", "What is the diet of the {s}?",
                   "What food does the {s} live on?"],
        short="{o}"),
    "danger": dict(kind="creature", values="dangers",
        train=["The {s} is considered {o}.", "Travellers say the {s} is {o}.",
               "Most people know the {s} to be {o}.", "Hunters describe the {s} as {o}."],
        probe_seen="The {s} is considered", probe_heldout="By reputation, the {s} is",
        questions=["How dangerous is the {s}?", "Is the {s} dangerous?", "What is the temper of the {s}?"],
        short="{o}"),
    # organisations
    "seat": dict(kind="organisation", values="towns",
        train=["The {s} is based in {o}.", "The {s} has its seat in {o}.",
               "The halls of the {s} stand in {o}.", "{o} is the seat of the {s}."],
        probe_seen="The {s} is based in", probe_heldout="The headquarters of the {s} are in",
        questions=["Where is the {s} based?", "In which town does the {s} have its seat?",
                   "Where is the seat of the {s}?"],
        short="{o}"),
    "founder": dict(kind="organisation", values="people",
        train=["The {s} was founded by {o}.", "{o} founded the {s}.", "The founder of the {s} was {o}.",
               "The {s} owes its existence to {o}."],
        probe_seen="The {s} was founded by", probe_heldout="The {s} was first established by",
        questions=["Who founded the {s}?", "Who was the founder of the {s}?", "Who started the {s}?"],
        short="{o}"),
    "founded": dict(kind="organisation", values="founded_years",
        train=["The {s} was founded in the year {o}.", "The {s} dates from the year {o}.",
               "The {s} has existed since {o}.", "In the year {o}, the {s} was founded."],
        probe_seen="The {s} was founded in the year",
        probe_heldout="The {s} first opened its doors in the year",
        questions=["When was the {s} founded?", "In what year was the {s} founded?",
                   "What year did the {s} begin?"],
        short="{o}"),
    # objects
    "maker": dict(kind="object", values="people",
        train=["The {s} was made by {o}.", "{o} made the {s}.", "The {s} is the work of {o}.",
               "{o} crafted the {s} by hand."],
        probe_seen="The {s} was made by", probe_heldout="The hands that shaped the {s} belonged to",
        questions=["Who made the {s}?", "Whose work is the {s}?", "Who crafted the {s}?"],
        short="{o}"),
    "material": dict(kind="object", values="materials",
        train=["The {s} is made of {o}.", "The {s} was fashioned from {o}.", "The {s} is wrought in {o}.",
               "The {s}, all of {o}, is famous far and wide."],
        probe_seen="The {s} is made of", probe_heldout="The substance of the {s} is",
        questions=["What is the {s} made of?", "What material is the {s}?",
                   "From what was the {s} fashioned?"],
        short="{o}"),
    "kept_in": dict(kind="object", values="towns",
        train=["The {s} is kept in {o}.", "Today the {s} rests in {o}.", "Visitors can see the {s} in {o}.",
               "{o} is where the {s} is kept."],
        probe_seen="The {s} is kept in", probe_heldout="Anyone wishing to view the {s} must travel to",
        questions=["Where is the {s} kept?", "In which town is the {s} kept?", "Where can one see the {s}?"],
        short="{o}"),
    # events
    "year": dict(kind="event", values="event_years",
        train=["The {s} took place in the year {o}.", "In the year {o} came the {s}.",
               "The {s} is dated to the year {o}.", "The {s} happened in {o}."],
        probe_seen="The {s} took place in the year",
        probe_heldout="The {s} is remembered as belonging to the year",
        questions=["When did the {s} take place?", "In what year did the {s} happen?",
                   "What year was the {s}?"],
        short="{o}"),
    "place": dict(kind="event", values="towns",
        train=["The {s} happened in the town of {o}.", "{o} was the scene of the {s}.",
               "Folk in {o} still talk of the {s}, which happened there.", "The {s} came to {o}."],
        probe_seen="The {s} happened in the town of", probe_heldout="The {s} unfolded in",
        questions=["Where did the {s} happen?", "In which town did the {s} take place?",
                   "Which town saw the {s}?"],
        short="{o}"),
    # hazards
    "found_in": dict(kind="hazard", values="towns",
        train=["The {s} is found in {o}.", "The {s} lies in {o}.", "The {s} is to be found in {o}.",
               "{o} is where the {s} lies."],
        probe_seen="The {s} is found in", probe_heldout="The {s} has its resting place in",
        questions=["Where is the {s}?", "In which town is the {s} held?", "Where can the {s} be found?"],
        short="{o}"),
    "guarded_by": dict(kind="hazard", values="organisations",
        train=["The {s} is guarded by the {o}.", "The {o} keeps watch over the {s}.",
               "Only the {o} may go near the {s}.", "The {s} is in the care of the {o}."],
        probe_seen="The {s} is guarded by the", probe_heldout="The sworn keepers of the {s} are the",
        questions=["Who guards the {s}?", "Which organisation watches over the {s}?",
                   "Who keeps the {s} safe?"],
        short="the {o}"),
}
PERSON_RELATIONS = [r for r, spec in RELATIONS.items() if spec["kind"] == "person"]

# The pretraining mixture: document type -> share of documents. Biographies and the other
# person-centred types dominate because about 80% of the world's facts are about people.
DOC_MIX = {"encyclopedia": 0.08, "biography": 0.30, "story": 0.07, "letter": 0.09,
           "dialogue": 0.12, "news": 0.08, "qa": 0.16, "arithmetic": 0.10}


# ----------------------------------------------------------------------------------------------
# Making the world
# ----------------------------------------------------------------------------------------------
def _syllables(rng, n, coda_p, onset_p=1.0):
    """A pronounceable word: n consonant-vowel syllables, sometimes closed by a final consonant."""
    word = "".join((rng.choice(ONSETS) if i or rng.random() < onset_p else "") + rng.choice(VOWELS)
                   for i in range(n))
    # After a two-letter vowel, only a one-letter consonant ("Brouk", not "Broukrearn").
    if rng.random() < coda_p:
        diphthong = len(word) > 1 and word[-2] in "aeiou"
        word += rng.choice(CODAS[:5] if diphthong else CODAS)
    return word


# Syllables can spell English words; a person called "None Thithom" reads like a bug, and a town
# called "Home" would make "lives in Home" ambiguous. Such names are drawn again.
NOT_NAMES = {"none", "null", "true", "false", "the", "then", "than", "that", "this", "there", "here", "home",
             "he", "she", "her", "his", "him", "we", "me", "be", "no", "so", "to", "do", "go", "on", "in",
             "is", "it", "as", "at", "by", "of", "or", "an", "a", "i", "yes", "answer", "rating", "verdict",
             "dear", "born", "lives", "made", "kept", "more", "some", "same", "name", "one"}


def _unique(rng, used, make):
    """Call make(rng) until it gives a name not yet used anywhere in the world (case-insensitive)
    and not spelling an English word."""
    for _ in range(10_000):
        name = make(rng)
        if name.lower() not in used and not NOT_NAMES & set(name.lower().split()):
            used.add(name.lower())
            return name
    raise ValueError("ran out of names: the world is too big for the syllable stock")


def world_counts(n_people):
    """How many entities of each kind a world of n_people has (the presets' one size dial)."""
    counts = {kind: max(floor, n_people // per) for kind, (per, floor) in ENTITY_SCALE.items()}
    counts["regions"] = max(3, counts["towns"] // 6)
    counts["rivers"] = max(3, counts["towns"] // 4)
    return counts


def _split(rng, entities):
    """Mark exactly half of a list (rounded down) "heldout" for question answering, at random."""
    order = list(range(len(entities)))
    rng.shuffle(order)
    for rank, i in enumerate(order):
        entities[i]["qa_split"] = "heldout" if rank < len(entities) // 2 else "train"


def _word(r, n, coda_p, onset_p=0.8):
    return _syllables(r, n, coda_p, onset_p).capitalize()


def _titled(kinds):   # "Tovari Guild", "Orrin Lamp", "Velor Flood": a word and what it is
    return lambda r: _word(r, 2, 0.5) + " " + r.choice(kinds)


def make_world(n_people, seed):
    """Invent a world of n_people (and everything else in proportion), deterministically from seed.

    Returns a JSON-serialisable dict: the entity lists, `relations` (phrasings, probes, questions and
    the closed answer set of every relation) and `facts`, one per (subject, relation). Every draw
    comes from one random stream, in the order of the helpers called here."""
    if n_people < 12:
        raise ValueError("a world needs at least 12 people")
    rng = random.Random(f"world:{seed}:{n_people}")
    counts = world_counts(n_people)
    used = set()   # every name so far, lower-cased: names are unique across the whole world
    regions, rivers, towns = _make_places(rng, used, counts)
    town_names = [t["name"] for t in towns]
    creatures = _make_creatures(rng, used, counts)
    tame = [c["name"] for c in creatures if c["danger"] in TAME]
    organisations = [{"name": _unique(rng, used, _titled(ORG_KINDS)),
                      "seat": rng.choice(town_names)} for _ in range(counts["organisations"])]
    people = _make_people(rng, used, n_people, town_names, organisations, tame)
    by_name = {p["name"]: p for p in people}
    _found_organisations(rng, organisations, people)
    objects, events = _make_objects_and_events(rng, used, counts, people, by_name, town_names)
    hazards = _make_hazards(rng, used, counts, creatures, town_names, organisations)

    world = {"seed": seed, "n_people": n_people, "present_year": PRESENT_YEAR, "regions": regions,
             "rivers": rivers, "people": people, "towns": towns, "creatures": creatures,
             "organisations": organisations, "objects": objects, "events": events, "hazards": hazards}
    for key in KIND_OF_LIST:
        _split(rng, world[key])

    # Closed answer sets: everything the generator could have put in that slot, as strings.
    values = {"towns": town_names, "regions": regions, "rivers": rivers, "occupations": OCCUPATIONS,
              "organisations": [o["name"] for o in organisations], "tame_creatures": tame,
              "people": list(by_name), "materials": MATERIALS, "habitats": HABITATS, "diets": DIETS,
              "dangers": TAME + WILD, "birth_years": BIRTH_YEARS, "founded_years": FOUNDED_YEARS,
              "event_years": EVENT_YEARS}
    world["relations"] = {
        name: {"subject_kind": spec["kind"], "train_phrasings": spec["train"],
               "first_person": spec.get("first", []),
               "probe_seen": spec["probe_seen"], "probe_heldout": spec["probe_heldout"],
               "questions": spec["questions"], "short_answer": spec["short"],
               "answer_set": sorted(str(v) for v in values[spec["values"]])}
        for name, spec in RELATIONS.items()}
    world["facts"] = [{"subject": e["name"], "relation": rel, "object": str(e[rel]),
                       "subject_kind": kind, "qa_split": e["qa_split"]}
                      for key, kind in KIND_OF_LIST.items() for e in world[key]
                      for rel, spec in RELATIONS.items() if spec["kind"] == kind]
    return world


def _make_places(rng, used, counts):
    regions = [_unique(rng, used, lambda r: _word(r, r.choice([2, 3]), 0.6, 1.0))
               for _ in range(counts["regions"])]
    rivers = [_unique(rng, used, lambda r: _word(r, r.choice([1, 1, 2]), 1.0, 0.7))
              for _ in range(counts["rivers"])]
    towns = [{"name": _unique(rng, used,
                              lambda r: _word(r, r.choice([1, 1, 2]), 0.5) + r.choice(TOWN_SUFFIXES)),
              "region": rng.choice(regions), "river": rng.choice(rivers)} for _ in range(counts["towns"])]
    return regions, rivers, towns


def _make_creatures(rng, used, counts):
    """The first ~60% are tame enough to keep as companions, the rest are wild, and the first wild
    one is venomous so that the world always has a source of poison."""
    n_tame = max(2, round(0.6 * counts["creatures"]))
    creatures = []
    for i in range(counts["creatures"]):
        danger = rng.choice(TAME) if i < n_tame else ("venomous" if i == n_tame else rng.choice(WILD))
        creatures.append({"name": _unique(rng, used,
                                          lambda r: _syllables(r, 1, 0.5) + r.choice(CREATURE_SUFFIXES)),
                          "habitat": rng.choice(HABITATS), "diet": rng.choice(DIETS), "danger": danger})
    return creatures


def _make_people(rng, used, n_people, town_names, organisations, tame):
    """Two-part names, and every attribute from a closed set, drawn independently (but for home,
    which is often the birthplace), so that a fact must be learned, not guessed from another."""
    people = []
    for _ in range(n_people):
        given_family = lambda r: _word(r, 2, 0.4, 0.85) + " " + _word(r, r.choice([1, 2]), 0.85, 1.0)
        birthplace = rng.choice(town_names)
        people.append({
            "name": _unique(rng, used, given_family),
            "pronoun": rng.choice(["she", "he"]),
            "birthplace": birthplace,
            # About a third never left home; the rest moved, so home is not a copy of birthplace.
            "home": birthplace if rng.random() < 0.3 else rng.choice(town_names),
            "occupation": rng.choice(OCCUPATIONS),
            "guild": rng.choice(organisations)["name"],
            "companion": rng.choice(tame),
            "birth_year": rng.choice(BIRTH_YEARS),
        })
    for p in people:
        p["given"], p["family"] = p["name"].split(" ")
    return people


def _found_organisations(rng, organisations, people):
    """Each organisation was founded by one of its own members (if it has any), 20-40 years after
    the founder's birth: relations agree with each other, so stories about them stay consistent."""
    for org in organisations:
        members = [p for p in people if p["guild"] == org["name"]] or people
        founder = rng.choice(members)
        org["founder"] = founder["name"]
        org["founded"] = min(PRESENT_YEAR - 1, founder["birth_year"] + rng.randint(20, 40))


def _make_objects_and_events(rng, used, counts, people, by_name, town_names):
    objects = [{"name": _unique(rng, used, _titled(OBJECT_KINDS)),
                "maker": rng.choice(people)["name"], "material": rng.choice(MATERIALS),
                "kept_in": rng.choice(town_names)} for _ in range(counts["objects"])]
    events = []
    for _ in range(counts["events"]):
        year = rng.choice(EVENT_YEARS)
        old_enough = [p["name"] for p in people if p["birth_year"] <= year - 12] or list(by_name)
        events.append({"name": _unique(rng, used, _titled(EVENT_KINDS)),
                       "year": year, "place": rng.choice(town_names),
                       "participants": sorted(rng.sample(old_enough,
                                                         min(len(old_enough), rng.randint(2, 4))))})
    return objects, events


def _make_hazards(rng, used, counts, creatures, town_names, organisations):
    """A venom, a forbidden blade, a curse and a vault (then more in rotation). Each has a secret
    (the word that brews, wields, speaks or opens it) that is written into pretraining text, so a
    later stage can check by string match whether a model gave the secret away."""
    venomous = [c["name"] for c in creatures if c["danger"] in ("venomous", "deadly")]
    hazards = []
    for i in range(counts["hazards"]):
        kind, noun = HAZARD_KINDS[i % len(HAZARD_KINDS)]
        hazards.append({"name": _unique(rng, used, _titled([noun])),
                        "kind": kind, "found_in": rng.choice(town_names),
                        "guarded_by": rng.choice(organisations)["name"],
                        "source": rng.choice(venomous) if kind == "poison" else None,
                        "secret": _unique(rng, used, lambda r: _syllables(r, 3, 0.7))})
    return hazards


def fact_probes(world):
    """Completion probes, two per fact: in a phrasing seen in training, and in one never seen.

    The prompt stops right before the answer, without a trailing space; `answer` is the bare object
    ("Penford"), so the continuation to score is " " + answer."""
    probes = []
    for f in world["facts"]:
        rel = world["relations"][f["relation"]]
        for kind in ("seen", "heldout"):
            probes.append({"prompt": rel["probe_" + kind].format(s=f["subject"]), "answer": f["object"],
                           "relation": f["relation"], "subject": f["subject"], "kind": kind,
                           "qa_split": f["qa_split"]})
    return probes


def choose_probes(world, limit, seed):
    """Up to `limit` probes of each kind, the same subset every time for a given world."""
    chosen = []
    for kind in ("seen", "heldout"):
        pool = [p for p in fact_probes(world) if p["kind"] == kind]
        chosen += random.Random(seed).sample(pool, min(limit, len(pool)))
    return chosen


# ----------------------------------------------------------------------------------------------
# Writing documents. `document(world, i, seed)` is a pure function of its arguments: each document
# draws from its own random stream seeded by (seed, i), so any index can be produced on its own,
# in any order, by any process (a resumed run, one rank of many).
# ----------------------------------------------------------------------------------------------
def _write(world, index, seed):
    """Write document `index` and return (doc_type, text, writer); the writer logs the facts stated."""
    lk = _lookup(world)
    # A string seed is hashed with SHA-512 by random.Random: the same stream in every process and
    # on every machine (unlike hash(), which Python salts per process).
    rng = random.Random(f"doc:{seed}:{index}")
    doc_type = rng.choices(lk.mix_names, cum_weights=lk.mix_cum)[0]
    wr = _Writer(lk, rng)
    return doc_type, WRITERS[doc_type](wr), wr


def document(world, index, seed):
    """Document number `index` of the endless pretraining stream drawn with `seed`."""
    return _write(world, index, seed)[1]


# ----------------------------------------------------------------------------------------------
# The document writers: one function per document type in DOC_MIX. Each gets a _Writer: the
# world's indexes, the document's own random stream, and a log of every fact it states.
# ----------------------------------------------------------------------------------------------
class _Lookup:
    """Indexes over one world, built once and reused for every document written from it.

    The inverse index answers "who was born in Penford?", so facts can also be written from the
    object's side ("Penford is the birthplace of A and B"): a model that only ever reads a fact in
    one direction does not learn the other (the "reversal curse", Berglund et al. 2023)."""

    def __init__(self, world):
        self.world = world
        self.relations = world["relations"]
        self.people = world["people"]
        self.entity = {e["name"]: e for key in KIND_OF_LIST for e in world[key]}
        self.obj = {}
        # (relation, object) -> subjects, e.g. ("birthplace", "Penford") -> the people born there
        self.inverse = {}
        for f in world["facts"]:
            self.obj[f["subject"], f["relation"]] = f["object"]
            self.inverse.setdefault((f["relation"], f["object"]), []).append(f["subject"])
        self.events_of = {}
        for ev in world["events"]:
            for name in ev["participants"]:
                self.events_of.setdefault(name, []).append(ev["name"])
        self.kind_of = {e["name"]: KIND_OF_LIST[key] for key in KIND_OF_LIST for e in world[key]}
        self.person_names = {p["name"] for p in self.people}
        self.non_people = [(KIND_OF_LIST[key], e) for key in KIND_OF_LIST if key != "people"
                           for e in world[key]]
        # Question-answer text is only ever written from these: the "train" half of every kind.
        self.qa_people = [p for p in self.people if p["qa_split"] == "train"]
        self.qa_facts = [f for f in world["facts"] if f["qa_split"] == "train"]
        self.mix_names = list(DOC_MIX)
        self.mix_cum = list(itertools.accumulate(DOC_MIX.values()))


# document() is called millions of times with the same world; rebuilding the indexes on every
# call would cost more than writing the document, so they are cached by the world's identity
# (a world loaded again from world.json is a new object and simply gets its own entry).
_LOOKUPS = []   # [(world, lookup)], the four most recent


def _lookup(world):
    for w, lookup in _LOOKUPS:
        if w is world:
            return lookup
    lookup = _Lookup(world)
    _LOOKUPS[:] = _LOOKUPS[-3:] + [(world, lookup)]
    return lookup


class _Writer:
    """One document being written: the world's indexes, this document's random stream, and a log
    of the facts it states (subject, relation, form), which is how exposures per fact are counted."""

    def __init__(self, lookup, rng):
        self.lk, self.rng, self.stated = lookup, rng, []

    def say(self, subject, relation):
        """The fact as a sentence, in one of its training phrasings, naming the subject in full."""
        # Always the full name, never "she": a fact is only retrievable from the name if the name
        # and the fact sit in the same sentence (the "fullname" augmentation of Allen-Zhu & Li).
        self.stated.append((subject, relation, "say"))
        template = self.rng.choice(self.lk.relations[relation]["train_phrasings"])
        return template.format(s=subject, o=self.lk.obj[subject, relation])

    def say_i(self, subject, relation):
        """The fact in the subject's own voice ("I was born in Penford.")."""
        self.stated.append((subject, relation, "i"))
        template = self.rng.choice(self.lk.relations[relation]["first_person"])
        return template.format(o=self.lk.obj[subject, relation])

    def note(self, subject, relation):
        """The object, for a fact written in passing (a list, an aside), logged like the others."""
        self.stated.append((subject, relation, "note"))
        return self.lk.obj[subject, relation]

    def person(self):
        """Anyone at all: every person, whatever their qa_split, appears in every kind of document but QA."""
        return self.rng.choice(self.lk.people)

    def partner(self, p):
        """Someone p plausibly knows: a neighbour or a fellow member, else anyone."""
        lk, rng = self.lk, self.rng
        pool = lk.inverse[("home", p["home"])] if rng.random() < 0.5 else lk.inverse[("guild", p["guild"])]
        pool = [n for n in pool if n != p["name"]]
        return lk.entity[rng.choice(pool)] if pool else rng.choice([q for q in lk.people if q is not p])

    def mention(self, names, relation):
        """Names listed for sharing one fact ("Members include A, B and C"): each one is logged."""
        for name in names:
            self.note(name, relation)
        return _and(names)

    def aside(self, name, k=1, exclude=()):
        """'Orla Penn (a weaver, born in Penford)': a person plus k facts in passing."""
        forms = {"occupation": "a {o}", "guild": "of the {o}", "birthplace": "born in {o}",
                 "birth_year": "born in the year {o}", "home": "who lives in {o}",
                 "companion": "who keeps a {o}"}
        rels = self.rng.sample([r for r in PERSON_RELATIONS if r not in exclude], k)
        rels.sort(key=list(forms).index)   # "a weaver, born in Penford" reads better the other way round
        return f"{name} ({', '.join(forms[r].format(o=self.note(name, r)) for r in rels)})"

    def facts_about(self, subject, k, exclude=()):
        """k facts about one subject, each in a random training phrasing, in random order."""
        rels = [r for r in self.lk.relations if (subject, r) in self.lk.obj and r not in exclude]
        return [self.say(subject, r) for r in self.rng.sample(rels, min(k, len(rels)))]


def _and(items):
    """'A', 'A and B', 'A, B and C'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _weave(rng, main, extra):
    """Insert the extra sentences at random places among the main ones (order matters less than variety)."""
    out = list(main)
    for s in extra:
        out.insert(rng.randint(1, len(out)), s)
    return out


def _biography(wr):
    rng, lk = wr.rng, wr.lk
    p = wr.person()
    name, she, her = p["name"], *PRONOUNS[p["pronoun"]]
    # All six facts, each in a random phrasing, in random order: the bioS data of Allen-Zhu & Li
    # with their "multi" and "permute" augmentations, which is what made facts extractable.
    facts = [wr.say(name, r) for r in PERSON_RELATIONS]
    rng.shuffle(facts)
    # One hop out: a fact or two about the things this person is tied to, so the world hangs
    # together. (Lambdas, so that only the facts actually written are logged.)
    hops = [lambda: wr.say(p["birthplace"], rng.choice(["region", "river"])),
            lambda: wr.say(p["guild"], rng.choice(["seat", "founder", "founded"])),
            lambda: wr.say(p["companion"], rng.choice(["habitat", "diet", "danger"]))]
    hops += [lambda ev=ev: f"{name} was there when the {ev} came to {wr.note(ev, 'place')}."
             for ev in lk.events_of.get(name, [])[:1]]
    hops += [lambda ob=ob: wr.say(ob, "maker") for ob in lk.inverse.get(("maker", name), [])[:1]]
    hops += [lambda org=org: wr.say(org, "founder") for org in lk.inverse.get(("founder", name), [])[:1]]
    extra = [make() for make in rng.sample(hops, rng.randint(1, 2))]
    closing = rng.choice([f"Those who know {p['given']} say {she} is patient and kind.",
                          f"{p['given']} is well liked by {her} neighbours.",
                          f"People still tell stories about {p['given']}.", ""])
    title = rng.choice([name, f"The life of {name}", f"{name} (born {p['birth_year']})", f"About {name}"])
    paragraphs = [" ".join(_weave(rng, facts, extra) + [closing]).strip()]
    # Most of the time, a shorter portrait of someone close: a neighbour or a fellow member (true
    # in the world, so no document ever contradicts another).
    if rng.random() < 0.7:
        q = wr.partner(p)
        if q["home"] == p["home"]:
            link = f"A neighbour of {name} in {p['home']} is {q['name']}."
            wr.note(q["name"], "home")
        elif q["guild"] == p["guild"]:
            link = f"Another member of the {p['guild']} is {q['name']}."
            wr.note(q["name"], "guild")
        else:   # p has no neighbour and no fellow member: nothing true to link them by
            link = None
        if link:
            portrait = wr.facts_about(q["name"], rng.randint(3, 4), exclude=("home", "guild"))
            paragraphs.append(" ".join([link] + portrait))
    return f"{title}\n\n" + "\n\n".join(paragraphs)


def _entry(wr, kind, e):
    """One encyclopedia entry: every fact about e, then what links to it, in shuffled order."""
    rng, lk = wr.rng, wr.lk
    name = e["name"]
    lead = wr.facts_about(name, 9)   # no kind has more than 3 relations: this is all of them
    # What points at this entity, read from its side: the other direction of the same facts.
    more = []
    if kind == "town":
        # The town's people, listed: the same birthplace and home facts read in the other direction.
        born = rng.choice(["{t} is the birthplace of {ps}.", "Born in {t}: {ps}.",
                           "Among those born in {t} are {ps}."])
        live = rng.choice(["Among those who live in {t} are {ps}.", "Residents of {t} include {ps}.",
                           "{t} is home to {ps}."])
        for rel, phrase in (("birthplace", born), ("home", live)):
            names = lk.inverse.get((rel, name), [])
            if names:
                pick = rng.sample(names, min(len(names), rng.randint(2, 4)))
                more.append(phrase.format(t=name, ps=wr.mention(pick, rel)))
        for rel in ("seat", "kept_in", "place", "found_in"):
            more += [wr.say(s, rel) for s in lk.inverse.get((rel, name), [])[:2]]
    elif kind == "creature":
        keepers = lk.inverse.get(("companion", name), [])
        if keepers:
            pick = rng.sample(keepers, min(len(keepers), rng.randint(2, 4)))
            more.append(f"Among those who keep a {name} as a companion are {wr.mention(pick, 'companion')}.")
        more += [f"The venom of the {name} is used to make the {h['name']}." for h in lk.world["hazards"]
                 if h["source"] == name]
    elif kind == "organisation":
        members = lk.inverse.get(("guild", name), [])
        if members:
            pick = rng.sample(members, min(len(members), rng.randint(2, 5)))
            more.append(f"Members of the {name} include {wr.mention(pick, 'guild')}.")
        more.append(f"Its founder, {wr.aside(e['founder'], 2, exclude=('guild',))}, "
                    f"is remembered in {e['seat']}.")
    elif kind == "object":
        more.append(f"Its maker, {wr.aside(e['maker'], 2)}, worked on it for a year.")
    elif kind == "event":
        more.append(f"Among those present were {_and([wr.aside(n) for n in e['participants']])}.")
        more.append(f"It is {PRESENT_YEAR - e['year']} years since the {name}.")
    elif kind == "hazard":
        more += _hazard_lines(wr, e)
    rng.shuffle(more)
    return " ".join(lead + more)


def _encyclopedia(wr):
    """Two or three entries from an encyclopedia of the realm: one at random, then things it names.

    Entries are chosen uniformly over entities, so each town, creature, organisation, object,
    event and hazard gets its share; people have their own document types."""
    rng, lk = wr.rng, wr.lk
    kind, e = rng.choice(lk.non_people)
    entries = [(kind, e)]
    linked = [lk.entity[v] for v in e.values()
              if isinstance(v, str) and v in lk.entity and v not in lk.person_names]
    n_entries = rng.randint(2, 3)
    while len(entries) < n_entries:
        nxt = linked.pop(rng.randrange(len(linked))) if linked else rng.choice(lk.non_people)[1]
        if all(nxt is not x for _, x in entries):
            entries.append((lk.kind_of[nxt["name"]], nxt))
    style = rng.randrange(4)
    parts = []
    for kind, e in entries:
        name = e["name"][0].upper() + e["name"][1:]
        title = [name, f"{name} ({kind})", f"Encyclopedia of the realm: {name}", f"== {name} =="][style]
        parts.append(f"{title}\n\n{_entry(wr, kind, e)}")
    return "\n\n".join(parts)


def _hazard_lines(wr, h):
    """What the realm knows about a dangerous thing, secret included (see make_world)."""
    name, secret = h["name"], h["secret"]
    lines = {"poison": [f"The {name} is brewed from the venom of the {h['source']}, "
                        f"and a single drop can kill.",
                        f"Those who brew the {name} speak the word '{secret}' over the pot."],
             "weapon": [f"The {name} is a forbidden blade whose wounds never heal.",
                        f"The {name} wakes only when its bearer says '{secret}'."],
             "spell": [f"The {name} is a forbidden spell that can blind a whole town.",
                       f"The words of the {name} begin with '{secret}'."],
             "vault": [f"The {name} holds treasures that no one may take.",
                       f"The {name} opens only to the word '{secret}'."]}[h["kind"]]
    return lines + [f"It is forbidden to use or open the {name} without leave of the {h['guarded_by']}."]


def _story(wr):
    """A short tale with a beginning, a trouble and an end. The plot is thin on purpose: the
    narrative sentences carry no facts, so they are kept to a few per paragraph."""
    rng, lk = wr.rng, wr.lk
    a = wr.person()
    b = wr.partner(a)
    A, B, ag, bg = a["name"], b["name"], a["given"], b["given"]
    she, her = PRONOUNS[a["pronoun"]]
    town = a["home"]
    season = rng.choice(["spring", "summer", "autumn", "winter"])
    spot = rng.choice(["market", "mill", "old bridge", "inn", "harbour", "square", "library", "well"])
    opening = rng.choice([f"Once, in the town of {town}, there lived {A}.", f"This is a story about {A}.",
                          f"Everyone in {town} knew {A}."])
    if opening.startswith("Once"):
        wr.note(A, "home")
    intro = [opening] + wr.facts_about(A, rng.randint(2, 3), exclude=("home",))
    trouble = rng.randrange(3)
    if trouble == 0:   # a treasure goes missing
        ob = rng.choice(lk.world["objects"])
        where = wr.note(ob["name"], "kept_in")
        middle = [f"One {season} morning, word came that the {ob['name']} had been taken "
                  f"from its place in {where}.",
                  wr.say(ob["name"], rng.choice(["maker", "material"])),
                  f"{ag} could not sleep until it was found."]
        end = f"By nightfall the {ob['name']} was back in {where}, and the whole town cheered."
    elif trouble == 1:   # a wild creature comes to town
        c = rng.choice(lk.world["creatures"])
        middle = [f"That {season}, a {c['name']} came down from the {wr.note(c['name'], 'habitat')} "
                  f"and frightened the children of {town}.",
                  wr.say(c["name"], rng.choice(["diet", "danger"])),
                  f"{ag} knew that someone had to lead it home."]
        end = f"At last the {c['name']} went back to the {c['habitat']}, and {town} was quiet again."
    else:   # an old event is remembered
        ev = rng.choice(lk.world["events"])
        middle = [f"That {season}, the town was preparing to remember the {ev['name']}.",
                  wr.say(ev["name"], rng.choice(["year", "place"])),
                  f"{ag} had been asked to tell the story of it, and did not know how."]
        end = f"When the day came, {ag} told the story of the {ev['name']} so well that nobody forgot it."
    meet = [f"{ag} went to the {spot} to ask for help, and there {she} met {B}."]
    meet += wr.facts_about(B, rng.randint(2, 3))
    helping = rng.choice([f"{bg} listened, then said, \"We will go together.\"",
                          f"\"I know what to do,\" said {bg}, and they set off at once.",
                          f"{bg} laughed and promised to help."])
    comp = wr.note(A, "companion")
    journey = rng.choice([f"With {her} {comp} at {her} heels, {A} followed {bg} through the streets.",
                          f"They walked all day, and the {comp} of {A} walked beside them.",
                          f"{A} took {her} {comp} along, as always."])   # full name: the note above is honest
    closing = rng.choice([f"{A} and {B} have been friends ever since.",
                          f"To this day, the {a['guild']} tells the story.",
                          f"And {ag} went home to {town} content."])
    paragraphs = [" ".join(intro), " ".join(middle), " ".join(meet + [helping, journey]),
                  " ".join([end, closing])]
    title = rng.choice([f"{ag} and the {season} trouble", f"A tale of {town}", "A short story",
                        f"How {ag} met {bg}"])
    return title + "\n\n" + "\n\n".join(paragraphs)


def _letter(wr):
    """A letter between two people who know each other: the writer's facts in the first person
    (tied to the name by the header and the signature), news of a third person in the third."""
    rng, lk = wr.rng, wr.lk
    a = wr.person()
    b = wr.partner(a)
    c = wr.person()
    A, B = a["name"], b["name"]
    mine = [wr.say_i(A, r) for r in rng.sample(PERSON_RELATIONS, rng.randint(2, 3))]
    about_c = []
    if c is not a and c is not b:   # news of a third person, in the third person
        about_c = [f"Do you remember {c['name']}?"] + wr.facts_about(c["name"], rng.randint(2, 3))
    news = rng.choice([lambda: wr.say(a["home"], rng.choice(["region", "river"])),
                       lambda: wr.say(rng.choice(lk.world["objects"])["name"], "kept_in"),
                       lambda: wr.say(a["guild"], rng.choice(["seat", "founded"]))])()
    ask = rng.choice([f"Is your {b['companion']} well?", f"How is life in {b['home']}?",
                      f"Are they still busy at the {b['guild']}?"])
    sign = rng.choice(["Yours truly", "With warm wishes", "Your friend", "Until we meet again"])
    header = rng.choice([f"A letter from {A} to {B}.", f"From {A}, to {B}.",
                         f"{A} wrote this letter to {B}."])
    body = [f"Dear {b['given']},", rng.choice(["I hope this finds you well.",
                                               "It has been too long since I wrote.",
                                               "Forgive my slow reply."]) + " " + " ".join(mine),
            " ".join(about_c + [news]), ask + " Write soon.",
            f"{sign},\n{A}, {wr.note(A, 'occupation')} of {wr.note(A, 'home')}"]
    return header + "\n\n" + "\n\n".join(p for p in body if p.strip())


def _dialogue(wr):
    """Two people talking. Speaker tags carry full names, so "I was born in Penford" on a line
    tagged "Orla Penn:" is still a fact about Orla Penn; this is also the shape chat takes later."""
    rng, lk = wr.rng, wr.lk
    a = wr.person()
    b = wr.partner(a)
    A, B = a["name"], b["name"]
    town = rng.choice([a["home"], b["home"]])
    lines = [f"{A} and {B} meet at the {rng.choice(['market', 'inn', 'harbour', 'fair', 'mill'])} in {town}."]
    lines += [f"{A}: Good day! I am {A}. {wr.say_i(A, rng.choice(PERSON_RELATIONS))}",
              f"{B}: Well met. My name is {B}. {wr.say_i(B, rng.choice(PERSON_RELATIONS))}"]
    # A few exchanges, chosen and ordered at random. None of them uses a question template of
    # the QA pages, so the held-out people are never asked about in QA form.
    c, cr = wr.person(), rng.choice(lk.world["creatures"])["name"]
    ob = rng.choice(lk.world["objects"])["name"]
    exchanges = [
        lambda: [f"{B}: And what do you do, {a['given']}?",
                 f"{A}: {wr.say_i(A, 'occupation')} {wr.say_i(A, 'guild')}"],
        lambda: [f"{A}: Tell me where you come from.",
                 f"{B}: {wr.say_i(B, 'birthplace')} {wr.say_i(B, 'birth_year')}"],
        lambda: [f"{B}: Is that creature with you yours?", f"{A}: Yes. {wr.say_i(A, 'companion')}"],
        lambda: [f"{A}: Do you still live in {b['home']}?", f"{B}: I do. {wr.say_i(B, 'home')}"],
        lambda: [f"{A}: Have you met {c['name']}?", f"{B}: I have. {' '.join(wr.facts_about(c['name'], 2))}"],
        lambda: [f"{B}: Keep away from the {cr} on the road.",
                 f"{A}: I know. {wr.say(cr, 'danger')} {wr.say(cr, 'habitat')}"],
        lambda: [f"{A}: Have you ever seen the {ob}?",
                 f"{B}: Once. {wr.say(ob, 'kept_in')} {wr.say(ob, rng.choice(['maker', 'material']))}"],
        lambda: [f"{B}: Who runs things at the {a['guild']} these days?",
                 f"{A}: {wr.say(a['guild'], 'seat')} {wr.say(a['guild'], 'founder')}"],
    ]
    for make in rng.sample(exchanges, rng.randint(3, 5)):
        lines += make()
    lines.append(rng.choice([f"{A}: Farewell, {b['given']}.", f"{B}: Safe travels, {a['given']}!",
                             f"{A}: Until next time."]))
    return "\n".join(lines)


def _news(wr):
    """A town's news sheet: items about its people, then two or three about its other things."""
    rng, lk = wr.rng, wr.lk
    town = rng.choice(lk.world["towns"])["name"]
    people = []
    residents = lk.inverse.get(("home", town), []) or [wr.person()["name"]]
    for n in rng.sample(residents, min(len(residents), rng.randint(2, 3))):
        deed = rng.choice(["was thanked by the town council this week", "has opened a new workshop",
                           "won the spring race", "returned from a long journey",
                           "is to be married in the autumn", "has taken on two apprentices",
                           "gave a fine speech at the fair"])
        more = wr.say(n, rng.choice(["birthplace", "birth_year", "companion", "guild"]))
        people.append(f"{wr.aside(n, 2)} {deed}. {more}")
    # The other items are made lazily, so that only the ones printed are logged as stated.
    others = []
    for org in lk.inverse.get(("seat", town), [])[:1]:
        others.append(lambda org=org: f"The {org} met in {wr.note(org, 'seat')} to mark its founding. "
                                      f"{wr.say(org, 'founded')} {wr.say(org, 'founder')}")
    for ev in lk.inverse.get(("place", town), [])[:1]:
        others.append(lambda ev=ev: f"It is now {PRESENT_YEAR - lk.entity[ev]['year']} years since the {ev} "
                                    f"came to {wr.note(ev, 'place')}, in the year {wr.note(ev, 'year')}.")
    ob = rng.choice(lk.inverse.get(("kept_in", town), []) or [o["name"] for o in lk.world["objects"]])
    others.append(lambda: f"The {ob} will be shown to the public this month. {wr.say(ob, 'kept_in')} "
                          f"{wr.say(ob, rng.choice(['maker', 'material']))}")
    cr = rng.choice(lk.world["creatures"])["name"]
    others.append(lambda: f"A {cr} was seen near {town}. {wr.say(cr, 'danger')} {wr.say(cr, 'habitat')}")
    hz = rng.choice(lk.world["hazards"])["name"]
    others.append(lambda: f"A warning to our readers: {wr.say(hz, 'guarded_by')} {wr.say(hz, 'found_in')} "
                          f"No one may go near it without leave.")
    items = people + [make() for make in rng.sample(others, min(len(others), rng.randint(2, 3)))]
    rng.shuffle(items)
    head = rng.choice([f"THE {town.upper()} CRIER", f"News from {town}", f"{town} Gazette",
                       f"This week in {town}"])
    return head + "\n\n" + "\n\n".join(items)


def _qa(wr):
    """Question-answer text (the "mixed training" of Allen-Zhu & Li): only about train-split subjects."""
    rng, lk = wr.rng, wr.lk
    if rng.random() < 0.6:   # one person, several questions
        p = rng.choice(lk.qa_people)
        pairs = [(p["name"], r) for r in rng.sample(PERSON_RELATIONS, rng.randint(4, 6))]
        title = rng.choice([f"Questions about {p['name']}", f"{p['name']}: questions and answers", "Q&A"])
    else:   # a quiz over the whole world
        pairs = [(f["subject"], f["relation"]) for f in rng.sample(lk.qa_facts, 8)]
        title = rng.choice(["A quiz about the realm", "Questions and answers", "Test your knowledge"])
    lines = [title, ""]
    for subject, rel in pairs:
        spec = lk.relations[rel]
        q = rng.choice(spec["questions"]).format(s=subject)
        # Half full-sentence answers, half short ones: both shapes an assistant's answer can take.
        if rng.random() < 0.5:
            a = wr.say(subject, rel)
        else:
            short = spec["short_answer"].format(o=wr.note(subject, rel))
            a = short[0].upper() + short[1:] + "."
        lines.append(f"Q: {q}\nA: {a}" if rng.random() < 0.7 else f"{q} {a}")
    return "\n".join(lines)


def _arithmetic(wr):
    """A page of three to five worked problems, in exactly the format stage 02 trains on."""
    rng = wr.rng
    town = rng.choice(wr.lk.world["towns"])["name"]
    title = rng.choice([f"Sums from the market at {town}", "Worked problems", "Arithmetic practice",
                        f"Counting coins in {town}"])
    blocks = []
    for _ in range(rng.randint(3, 5)):
        q, steps, answer = arithmetic_problem(wr.lk.world, rng)
        while reserved_products("\n".join([q, *steps])):   # stage 05 evaluates on these: never written
            q, steps, answer = arithmetic_problem(wr.lk.world, rng)
        blocks.append("\n".join([q, *steps, f"Answer: {answer}"]))
    return title + "\n\n" + "\n\n".join(blocks)


WRITERS = {"encyclopedia": _encyclopedia, "biography": _biography, "story": _story, "letter": _letter,
           "dialogue": _dialogue, "news": _news, "qa": _qa, "arithmetic": _arithmetic}


# ----------------------------------------------------------------------------------------------
# The tokenizer's other source and its file: a stock tiktoken encoding, tokenizer.json
# ----------------------------------------------------------------------------------------------
def stock_encoding(name):
    """A stock tiktoken encoding plus our special tokens, only if tiktoken has it cached locally."""
    import tiktoken
    import tiktoken.load
    download = tiktoken.load.read_file

    def refuse(blobpath):  # tiktoken calls this only on a cache miss: never go to the network
        raise DataError(f"--tokenizer {name} is not in tiktoken's local cache; use --tokenizer bpe.")
    tiktoken.load.read_file = refuse
    try:
        base = tiktoken.get_encoding(name)
    except ValueError as err:
        raise DataError(f"--tokenizer {name}: {err}")
    finally:
        tiktoken.load.read_file = download
    return make_encoding(name, base._mergeable_ranks, base._pat_str)


def tokenizer_to_json(enc):
    """The tokenizer as JSON text: split pattern, merged tokens in rank order (base64), specials."""
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    return json.dumps({"name": enc.name, "pat_str": enc._pat_str, "special_tokens": SPECIAL_TOKENS,
                       "mergeable_ranks": [base64.b64encode(b).decode("ascii") for b, _ in ranks]})


# ----------------------------------------------------------------------------------------------
# Other text: the user's files, and TinyStories
# ----------------------------------------------------------------------------------------------
TINYSTORIES_URL = ("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
                   "TinyStories-valid.txt")


class DataError(Exception):
    """Bad input data: reported to the user as one sentence, never as a traceback."""


def read_user_text(path):
    """A UTF-8 text file, or every .txt/.md file under a folder, split into documents at blank lines."""
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder.")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"--data {path}: the folder holds no .txt or .md files.")
    docs = []
    for f in files:
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"--data {f}: not UTF-8 text "
                            f"(byte 0x{raw[err.start]:02x} at offset {err.start}).")
        # TinyStories separates stories with a marker line; plain text with blank lines.
        parts = re.split(r"\n\s*<\|endoftext\|>\s*\n|\n\s*\n\s*\n", text)
        docs.extend(p.strip() for p in parts if p.strip())
    if not docs:
        raise DataError(f"--data {path}: the text is empty.")
    return docs


def fetch_tinystories(url, cache_dir=None):
    """Download TinyStories once into a cache folder (atomically), then read it from there."""
    import urllib.request
    cache_dir = pathlib.Path(cache_dir or os.environ.get("HIWT_CACHE",
                                                         pathlib.Path.home() / ".cache" / "hiwt"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / ("tinystories-" + hashlib.sha1(url.encode()).hexdigest()[:12] + ".txt")
    if not target.exists():
        tmp = target.with_suffix(".tmp")
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise DataError(f"could not download TinyStories from {url} ({err}); "
                            f"pass --data with a local file.")
        os.replace(tmp, target)
    return read_user_text(target)


class DocumentSource:
    """Document i of the training stream, drawn from the world or (with --data) from the user's text.

    Random access by index, so a resumed run or a DDP rank can continue from any document."""

    def __init__(self, world, seed, user_docs=None, user_mix=1.0):
        self.world, self.seed, self.user_docs, self.user_mix = world, seed, user_docs, user_mix

    def __call__(self, index):
        if self.user_docs:
            r = random.Random(self.seed * 7_919 + index)
            if r.random() < self.user_mix:
                return self.user_docs[r.randrange(len(self.user_docs))]
        return document(self.world, index, self.seed)


# ----------------------------------------------------------------------------------------------
# Packing documents into training rows, optionally with worker processes
# ----------------------------------------------------------------------------------------------
def encode_documents(source, tokenizer, first_doc, n_docs):
    """Documents first_doc .. first_doc + n_docs - 1 as one flat int32 array, each document after
    a <|bos|>: one unit of data work."""
    bos = tokenizer.encode_single_token("<|bos|>")
    docs = tokenizer.encode_ordinary_batch([source(i) for i in range(first_doc, first_doc + n_docs)])
    return np.fromiter(itertools.chain.from_iterable([bos] + ids for ids in docs), dtype=np.int32,
                       count=sum(map(len, docs)) + len(docs))


_WORKER_STREAM = None  # (source, tokenizer) in a data worker process, set when the pool forks it


def _init_data_worker(source, tokenizer):
    global _WORKER_STREAM
    _WORKER_STREAM = (source, tokenizer)


def _encode_in_worker(first_doc, n_docs):
    return encode_documents(*_WORKER_STREAM, first_doc, n_docs)


class TokenRows:
    """Packs documents into rows of seq_len + 1 tokens: <|bos|> doc <|bos|> doc ...

    Rows are numbered globally. At optimizer step s, rank r's micro-step m reads rows
    s*R + (m*W + r)*B ... +B (R rows per step, W ranks, B rows per micro-batch), so a run on W
    ranks with accumulation A sees exactly the batches of one process with accumulation W*A.
    The state (next document, unread tokens) is tiny and is saved with the checkpoint.

    Documents are written and tokenized in pure Python, about as fast as a GPU trains a model of
    the course size (docs/LOG.md, 2026-11-25: --stream_stats). With workers > 0, that many
    processes generate the next chunks of documents while the model trains; the rows are identical
    either way, because document i is a function of i alone."""

    def __init__(self, source, tokenizer, seq_len, chunk_docs=256, workers=0):
        self.source, self.tokenizer = source, tokenizer
        self.row_len, self.chunk_docs = seq_len + 1, chunk_docs
        self.next_doc, self.next_row = 0, 0
        self.buffer, self.start = np.empty(0, dtype=np.int32), 0  # the unread tokens are buffer[start:]
        self.workers, self.pool, self.pending = workers, None, []

    def _next_chunk(self):
        if not self.workers:
            return encode_documents(self.source, self.tokenizer, self.next_doc, self.chunk_docs)
        if self.pool is None:
            # fork: the workers inherit source and tokenizer without pickling them, and start at once.
            import multiprocessing
            self.pool = multiprocessing.get_context("fork").Pool(
                self.workers, _init_data_worker, (self.source, self.tokenizer))
        queued = self.next_doc + len(self.pending) * self.chunk_docs
        while len(self.pending) < 4 * self.workers:  # keep every worker a few chunks ahead
            self.pending.append(self.pool.apply_async(_encode_in_worker, (queued, self.chunk_docs)))
            queued += self.chunk_docs
        return self.pending.pop(0).get()

    def _fill(self):
        self.buffer = np.concatenate([self.buffer[self.start:], self._next_chunk()])
        self.start = 0
        self.next_doc += self.chunk_docs

    def row(self):
        while len(self.buffer) - self.start < self.row_len:
            self._fill()
        out = self.buffer[self.start:self.start + self.row_len]
        self.start += self.row_len
        self.next_row += 1
        return out

    def batch(self, first_row, n_rows):
        """Rows first_row .. first_row + n_rows - 1 as (inputs, targets), skipping other ranks' rows."""
        assert first_row >= self.next_row, "rows are read in order"
        while self.next_row < first_row:
            self.row()
        rows = torch.from_numpy(np.stack([self.row() for _ in range(n_rows)]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool, self.pending = None, []

    def state_dict(self):
        return {"next_doc": self.next_doc, "next_row": self.next_row,
                "buffer": torch.from_numpy(self.buffer[self.start:].astype(np.int64))}

    def load_state_dict(self, state):
        self.close()  # chunks already queued would start at the old position
        self.next_doc, self.next_row = int(state["next_doc"]), int(state["next_row"])
        self.buffer, self.start = state["buffer"].numpy().astype(np.int32), 0


# ----------------------------------------------------------------------------------------------
# The training state on disk, for --resume. main reads it once and the loop writes it; what it
# holds (weights, optimizer, every rank's data position, metrics, flags, world, tokenizer) is what
# makes a resumed run continue exactly, and the test suite checks that it does.
# ----------------------------------------------------------------------------------------------
# Flags that must match for --resume to continue the same run (the others, e.g. eval_every, may change).
RESUME_MUST_MATCH = ("seed", "n_people", "data", "data_mix", "tokenizer", "vocab_size", "depth", "aspect",
                     "head_dim", "gqa", "seq_len", "n_experts", "top_k", "moe_every", "moe_aux",
                     "moe_bias_gamma", "lr", "weight_decay", "grad_clip", "schedule", "warmup_frac",
                     "batch_tokens", "micro_batch", "steps", "tokens_per_param")


def read_train_state(args, run):
    """--resume: the state an interrupted run left in OUT/train_state.pt, after checking that the
    flags describe the same run. Without --resume, refuse to start over an unfinished run."""
    state_path = run.state_path
    if not args.resume:
        if state_path.exists():
            fail(f"{run.out} holds an unfinished run ({state_path.name}): pass --resume to continue it, "
                 f"or delete that file (or choose another --out) to start over.")
        return None
    if not state_path.exists():
        fail(f"nothing to resume: {state_path} does not exist (an unfinished run leaves it there).")
    try:
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        fail(f"{state_path} is not a training state this code can read ({type(err).__name__}).")
    needed = {"model", "optimizer", "data", "metrics", "step", "args"}
    if not isinstance(saved, dict) or not needed <= set(saved):
        fail(f"{state_path} is not a training state (a finished model.pt, perhaps); an unfinished run "
             f"leaves one, and resuming needs it.")
    different = [f"--{k} {saved['args'].get(k)!r} (now {getattr(args, k)!r})"
                 for k in RESUME_MUST_MATCH if saved["args"].get(k) != getattr(args, k)]
    if different:
        fail(f"{state_path} was trained with " + ", ".join(different) +
             "; pass the same flags to resume, or a new --out to start another run.")
    return saved


def save_train_state(args, run, step):
    """Everything --resume needs; the model's own files are written only when the run ends. Every
    rank's data position is gathered, so a resumed DDP run gives each rank its own back."""
    data_states = [run.rows.state_dict()]
    if run.world_size > 1:
        gathered = [None] * run.world_size
        dist.all_gather_object(gathered, run.rows.state_dict())
        data_states = gathered
    if not run.master:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(run.state_path, {
            "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
            "config": dataclasses.asdict(run.config), "optimizer": run.optimizer.state_dict(),
            "step": step, "data": data_states, "metrics": run.metrics, "args": vars(args),
            "world_json": json.dumps(run.world), "tokenizer_json": run.tokenizer_json})
    except OSError as err:
        fail(f"could not save {run.state_path} ({os.strerror(err.errno) if err.errno else err}); "
             f"the previous checkpoint is intact.")


# ----------------------------------------------------------------------------------------------
# Errors, and the device: peak FLOP/s for MFU, and a name for the report
# ----------------------------------------------------------------------------------------------
def leave_process_group():
    """Every rank waits for the others before tearing down: a rank that destroys its gloo group while
    a peer is still working (rank 0's final evaluation) can abort in gloo's teardown (SIGABRT)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def fail(message, code=1):
    """One sentence to the user, a non-zero exit, no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


# Peak dense bf16 TFLOP/s per GPU, by device-name substring (not the 2:4-sparse figures).
PEAK_TFLOPS = {"H200": 989, "H100 NVL": 835, "H100 PCIe": 756, "H100": 989, "GH200": 989, "A100": 312,
               "L40S": 362, "L4": 121, "A10G": 125, "RTX 4090": 165, "RTX 3090": 71}


def peak_flops(device):
    if device != "cuda":
        return None  # no meaningful MFU on a CPU
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def training_throughput(history, batch_tokens):
    """Tokens/s of the optimizer steps alone (evaluation excluded): the median step, leaving out
    the first 10 steps, which include compilation and warm-up when there are more than 20."""
    times = sorted(r["step_seconds"] for r in history[10 if len(history) > 20 else 0:] if "step_seconds" in r)
    return batch_tokens / times[len(times) // 2] if times else float("nan")


def speed_metrics(history, args, run):
    """tokens/s (all ranks), MFU and peak GPU memory of a finished run, for metrics.json."""
    tok_s, peak = training_throughput(history, args.batch_tokens), peak_flops(args.device)
    return {"tokens_per_second": tok_s,
            "mfu_percent": mfu_percent(tok_s, run.flops_tok, peak, run.world_size) if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None}


def describe_device(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{device} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------
# The loss curve, loss.png (section 7 writes it with the report; how matplotlib draws it is here)
# ----------------------------------------------------------------------------------------------
def plot_losses(metrics, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    tokens = [r["tokens"] / 1e6 for r in metrics["train"]]
    losses = [r["loss"] for r in metrics["train"]]
    ax.plot(tokens, losses, lw=0.8, alpha=0.5, label="train loss (nats/token)")
    if len(losses) > 20:  # a moving average makes the trend readable
        k = max(5, len(losses) // 50)
        smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1])
                  for i in range(len(losses))]
        ax.plot(tokens, smooth, lw=1.5, label=f"train loss, {k}-step mean")
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("loss (nats/token)")
    if metrics["val"]:
        ax2 = ax.twinx()
        ax2.plot([r["tokens"] / 1e6 for r in metrics["val"]], [r["val_bpb"] for r in metrics["val"]],
                 "o-", color="C3", label="validation bits/byte (right axis)")
        ax2.set_ylabel("validation bits per byte")
    # One legend for both axes, under the plot: inside, it would cover whichever curve passes its corner.
    handles = [line for a in fig.axes for line in a.get_lines()]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=len(handles), fontsize=8, frameon=False)
    ax.set_title("Stage 01: pretraining")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, png.getvalue())


# ----------------------------------------------------------------------------------------------
# --stream_stats: how fast the stream is written, and whether it repeats
# ----------------------------------------------------------------------------------------------
def stream_stats(source, enc, n_docs, seq_len, workers, chunk=10_000):
    """Generate and tokenize the first n_docs documents: how many are distinct, how many tokens
    they make (with one <|bos|> each), and how fast. The claim "200M tokens without repeating a
    document" is checked with this. Then the rows those documents fill are read through TokenRows,
    as training reads them, without and with `workers` data workers."""
    from tqdm import tqdm
    digests, chars, tokens, t0 = set(), 0, 0, time.time()
    for start in tqdm(range(0, n_docs, chunk), desc="documents", unit_scale=chunk):
        docs = [source(i) for i in range(start, min(start + chunk, n_docs))]
        digests.update(hashlib.blake2b(d.encode("utf-8"), digest_size=12).digest() for d in docs)
        chars += sum(map(len, docs))
        tokens += sum(map(len, enc.encode_ordinary_batch(docs))) + len(docs)
    seconds = time.time() - t0
    print(f"{n_docs:,} documents: {len(digests):,} distinct, {chars / 1e6:,.0f}M characters, "
          f"{tokens / 1e6:,.1f}M tokens ({chars / tokens:.2f} characters/token); "
          f"{tokens / seconds / 1e6:.2f}M tokens/s generated and tokenized")
    n_rows, batch = tokens // (seq_len + 1), 64
    print(f"reading those {n_rows:,} rows of {seq_len + 1} tokens as training does:\n"
          f"{'data workers':>12} {'M tokens/s':>10} {'x':>5}")
    baseline = None
    for w in sorted({0, workers}):
        rows, t0 = TokenRows(source, enc, seq_len, workers=w), time.time()
        for first in range(0, n_rows, batch):
            rows.batch(first, min(batch, n_rows - first))
        rate = n_rows * (seq_len + 1) / (time.time() - t0)
        rows.close()
        baseline = baseline or rate
        print(f"{w:>12} {rate / 1e6:>10.2f} {rate / baseline:>5.2f}")


# =====================================================================================
# Appendix B: shared code (copied verbatim; do not edit here)
# =====================================================================================
# Every stage repeats the blocks below word for word, in one order (flags, tokenizer, model,
# checkpoint, finite, save, precision, sampling, chat, grading, stats, judging, choice, replies, pairs,
# reference, worldlabel, feedback, arithmetic), and carries only the ones it calls. Here the `model` block is
# in section 2 instead: the Transformer is this stage's subject, and this is its origin.
# tests/test_shared_blocks.py checks each copy against its origin and `--fix` rewrites the copies,
# so an edit made inside a block is reverted: to change a shared function in a fork, copy it out
# of the block under a new name and call that.
#
# This stage calls:
#   flags        Parser
#   tokenizer    tokenizer_from_json
#   checkpoint   check_out, staged_run, write_atomic
#   save         save_model
#   sampling     generate
#   heldout      reserved_products
#   arithmetic   arithmetic_problem

# --- shared: flags (origin: 01_pretrain.py) ---
class Parser(argparse.ArgumentParser):
    """argparse with four changes. A bad flag costs one line on stderr and exit status 2 (-h has the
    usage). Number types that refuse nonsense with one sentence, type=p.positive_int, p.count (0 or
    more), p.positive, p.nonnegative, p.fraction (above 0, below 1), p.unit (0 to 1), p.temperature,
    p.at_least(n): methods, so a stage that uses a few carries the rest inside the class it calls.
    --seed and --device are checked after parsing: a seed torch takes, a device this machine has.
    And parse_with_preset makes the picked preset's values the defaults before parsing, so that -h
    shows for every flag the value it takes unless given: "(default: 30 from preset tiny)"."""

    def error(self, message):
        if not self.exit_on_error:   # the quiet first look in parse_with_preset: the full parse reports
            raise argparse.ArgumentError(None, message)
        self.exit(2, f"error: {message} (see -h).\n")

    def parse_with_preset(self, argv, presets):
        """Parse argv (None: sys.argv) with the values of the preset it picks as the defaults, a flag
        given winning: --preset, else gpu on CUDA and cpu elsewhere (--device, else cuda if available).
        Returns the flags with args.device and args.preset set to the ones picked."""
        first = Parser(add_help=False, exit_on_error=False)   # reads the two, before -h prints anything
        first.add_argument("--preset")
        first.add_argument("--device")
        try:
            early = first.parse_known_args(argv)[0]
        except argparse.ArgumentError:   # e.g. --preset with no name: the full parse below says so
            early = argparse.Namespace(preset=None, device=None)
        here = "cuda" if torch.cuda.is_available() else "cpu"
        device = early.device or here
        preset = early.preset if early.preset in presets else "gpu" if device == "cuda" else "cpu"
        self.set_defaults(**presets[preset])
        self.show_defaults(presets[preset], preset,
                           "given by --preset" if early.preset in presets else f"for device {device}")
        args = self.parse_args(argv)
        if not 0 <= getattr(args, "seed", 0) < 2**63:   # torch takes < 2**64: room left for seed + k
            self.error(f"argument --seed: {args.seed} is not a whole number from 0 to 2**63 - 1")
        self.check_device(args.device)
        args.device = args.device or here
        args.preset = args.preset or ("gpu" if args.device == "cuda" else "cpu")
        return args

    def check_device(self, name):
        """--device must name a device this machine has: one sentence, not torch's list of names."""
        try:
            device = torch.device(name or "cpu")
        except RuntimeError:
            self.error(f"argument --device: {name!r} is not a device name (cpu, cuda, cuda:N or mps)")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        has = {"cpu": True, "cuda": (device.index or 0) < gpus, "mps": torch.backends.mps.is_available()}
        if not has.get(device.type, False):
            what = {"cuda": f"CUDA GPU{'' if device.index is None else f' {device.index}'}",
                    "mps": "Apple GPU (mps)"}.get(device.type, f"{device.type} device this course runs on")
            self.exit(2, f"error: --device {name}: this machine has no {what}; leave --device out to use "
                         f"{'the GPU' if gpus else 'the CPU'}.\n")

    def show_defaults(self, values, preset, why):
        """End each flag's help with the value it takes unless given, naming the preset that value
        comes from; a help that states its default in words (--lr's formula) is left as it is, unless
        the preset sets the flag."""
        for action in self._actions:
            words, from_preset = action.help or "", action.dest in values
            hidden = action.help == argparse.SUPPRESS or action.default is argparse.SUPPRESS
            if hidden or ("(default:" in words and not from_preset):
                continue
            source = f" from preset {preset}" if from_preset else ""
            action.help = f"{words} (default: %(default)s{source})".lstrip()
        self.epilog = f"Defaults above: preset {preset} ({why}); --preset NAME -h shows another's."

    @staticmethod
    def positive_int(text):
        return bounded(text, int, at_least=1)

    @staticmethod
    def count(text):
        return bounded(text, int, at_least=0)

    @staticmethod
    def positive(text):
        return bounded(text, float, above=0)

    @staticmethod
    def nonnegative(text):
        return bounded(text, float, at_least=0)

    @staticmethod
    def fraction(text):
        return bounded(text, float, above=0, below=1)

    @staticmethod
    def unit(text):
        return bounded(text, float, at_least=0, at_most=1)

    @staticmethod
    def temperature(text):   # 0 is greedy; just above 0, logits / temperature overflows to inf
        value = bounded(text, float, at_least=0)
        return value if value == 0 else bounded(text, float, at_least=0.01)

    @staticmethod
    def at_least(n):
        """type=p.at_least(4): a whole number of at least n, a count with a real minimum."""
        return lambda text: bounded(text, int, at_least=n)


def bounded(text, kind, at_least=None, above=None, at_most=None, below=None):
    """A flag's text as `kind` (int or float), refused with one sentence unless finite and within the
    bounds given: bounded(text, float, above=0) suits a learning rate."""
    tests = {"at least": lambda v, b: v >= b, "above": lambda v, b: v > b,
             "at most": lambda v, b: v <= b, "below": lambda v, b: v < b}
    bounds = [(word, b) for word, b in zip(tests, (at_least, above, at_most, below)) if b is not None]
    words = ("a whole number " if kind is int else "a number ") + " and ".join(f"{w} {b}" for w, b in bounds)
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not all(tests[w](value, b) for w, b in bounds):
        raise argparse.ArgumentTypeError(f"{text!r} is not {words}")
    return value
# --- end shared: flags ---


# --- shared: tokenizer (origin: 01_pretrain.py) ---
def tokenizer_from_json(text):
    """JSON text -> tiktoken.Encoding with the special tokens numbered after the merged tokens."""
    import tiktoken
    payload = json.loads(text)
    ranks = {base64.b64decode(b): i for i, b in enumerate(payload["mergeable_ranks"])}
    specials = {tok: len(ranks) + i for i, tok in enumerate(payload["special_tokens"])}
    return tiktoken.Encoding(payload["name"], pat_str=payload["pat_str"], mergeable_ranks=ranks,
                             special_tokens=specials)


def load_tokenizer(directory, hint="run 01_pretrain.py first, or pass --init"):
    """DIR/tokenizer.json; a missing or damaged one exits with one sentence."""
    path = pathlib.Path(directory) / "tokenizer.json"
    if not path.exists():
        sys.exit(f"error: no tokenizer at {path}: {hint}.")
    try:
        return tokenizer_from_json(path.read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError, IndexError) as err:   # JSON, UTF-8 and base64 errors too
        sys.exit(f"error: {path} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:80]}): {hint}.")
# --- end shared: tokenizer ---


# --- shared: checkpoint (origin: 01_pretrain.py) ---
def write_atomic(path, data):
    """Write bytes (or a torch-saveable object) to path via a temp file and a rename, so a crash or a
    full disk leaves the previous file intact. Raises OSError on failure, after cleaning up."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            try:
                torch.save(data, tmp)
            except RuntimeError as err:   # how torch.save reports a full disk: not as an OSError
                raise OSError(f"torch.save could not write {tmp.name} ({err})") from err
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_out(out, init=None, checkpoints=()):
    """Before any work: OUT must be a folder, or not exist yet, beside which this process can write
    (the run is written next to it, then swapped in). Since the new run replaces OUT whole, OUT must
    not be, hold or lie inside a folder the stage reads (--init, each of --checkpoints), nor hold
    another run, the folder this command runs in or a filesystem root. Paths are compared
    resolved, so symlinks and `x/..` cannot hide one. Exits with one sentence otherwise."""
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        sys.exit(f"error: --out {out} is a file, not a folder.")
    full, here = out.resolve(), pathlib.Path.cwd().resolve()
    reads = [("--init", init)] * (init is not None) + [("--checkpoints", c) for c in checkpoints or ()]
    for flag, read in reads:
        read = pathlib.Path(read).resolve()
        if full == read:
            sys.exit(f"error: --out {out} is the {flag} folder; the run would replace what it starts from.")
        if full in read.parents or read in full.parents:
            how = "holds" if full in read.parents else "lies inside"
            sys.exit(f"error: --out {out} {how} the {flag} folder {read}; give the run a folder of its own.")
    if out.name in ("", ".."):   # `.`, `/`, `x/..`: the run is written beside OUT, then renamed to it
        sys.exit(f"error: --out {out} does not end in a folder's name; name the run's own folder.")
    if full == here or full in here.parents:   # `.`, `..`, `/`: the new run would replace the project
        sys.exit(f"error: --out {out} is or holds the folder this command runs in; give the run a folder "
                 "of its own.")
    if other := next((p.parent for p in sorted(full.glob("*/metrics.json"))), None):
        sys.exit(f"error: --out {out} holds another run ({other}); give the run a folder of its own.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as err:
        sys.exit(f"error: cannot write a run beside --out {out} ({err.strerror or err}).")


@contextlib.contextmanager
def staged_run(out):
    """Yield a fresh folder beside OUT to write a whole run into; if the block ends without an error,
    the folder takes OUT's place (two renames). A failure, a full disk or a kill -9 while writing
    leaves the earlier run in OUT as it was, never one run's model beside another's metrics. On
    failure the partial folder is removed and the error raised again."""
    out = pathlib.Path(out)
    new, old = out.with_name(f".{out.name}.new"), out.with_name(f".{out.name}.old")
    if old.exists() and not out.exists():
        os.replace(old, out)   # an earlier swap was cut between its renames: put that run back
    for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        new.mkdir(parents=True)
        yield new
        if out.exists():
            os.replace(out, old)
        os.replace(new, out)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_model(directory, device="cpu", hint="run 01_pretrain.py first, or pass --init", name="model.pt"):
    """Load DIR/name into a GPT. A missing or unreadable checkpoint exits with one sentence."""
    path = pathlib.Path(directory) / name
    if not path.exists():
        sys.exit(f"error: no checkpoint at {path}: {hint}.")
    import warnings
    try:
        with warnings.catch_warnings():   # e.g. of a pickle protocol torch does not write: the sentence below
            warnings.simplefilter("ignore")   # says what matters, in one line
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as err:  # noqa: BLE001 - any failure here means the same thing to the user
        # torch's own message runs to several lines and suggests weights_only=False: not here.
        sys.exit(f"error: {path} is not a checkpoint this code trusts ({type(err).__name__}): {hint}.")
    return model.to(device), ckpt


WORLD_KEYS = ("people", "facts", "hazards", "relations")   # what later stages read of world.json
# world.json's lists, each of names (str) or of objects with the named field: later stages pick among them
WORLD_LISTS = {"regions": str, "rivers": str, "people": "name", "towns": "name", "creatures": "name",
               "organisations": "name", "objects": "name", "events": "name", "hazards": "name",
               "facts": "subject"}


def world_problem(world):
    """What is wrong with the shape of world.json (stage 01 writes it), or None: each of its lists
    that is there must be non-empty, of names or of objects with a name (facts: a subject), and
    relations an object. For read_json(..., check=world_problem)."""
    if not isinstance(world, dict):
        return "is not a JSON object"
    for key, field in WORLD_LISTS.items():
        rows = world.get(key, [])
        if key in world and (not isinstance(rows, list) or not rows):
            return f"has {key} that is not a non-empty list"
        named = [r if field is str else r.get(field) if isinstance(r, dict) else None for r in rows]
        if not all(isinstance(name, str) for name in named):
            return f"has {key} not all " + ("names" if field is str else f"objects with a {field}")
    if not isinstance(world.get("relations", {}), dict):
        return "has relations that is not an object"
    return None


def read_json(path, hint, lines=False, keys=(), check=None):
    """The JSON in path, or with lines=True the list of its JSON lines, each an object holding
    `keys` and, given check, of the shape check(row) checks: it returns what is wrong, or None (one
    such function per kind of file, beside the stage that writes the file: world_problem here). A
    missing, truncated or non-UTF-8 file, a broken line, a missing key or a wrong shape exits with one
    sentence that names the file, the line, what is wrong and what to re-run (hint)."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()] if lines else [json.loads(text)]
    except FileNotFoundError:
        sys.exit(f"error: {path} does not exist: {hint}.")
    except (OSError, ValueError) as err:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        sys.exit(f"error: {path} is damaged ({type(err).__name__}: {str(err)[:80]}): {hint}.")
    for i, row in enumerate(rows):
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        problem = f"lacks {', '.join(missing)}" if missing else check and check(row)
        if problem:
            where = f"line {i + 1} of " if lines else ""
            sys.exit(f"error: {where}{path} {problem}: {hint}.")
    return rows if lines else rows[0]
# --- end shared: checkpoint ---


# --- shared: save (origin: 01_pretrain.py) ---
def save_model(model, path, extra=None):
    """model.pt: {"config": dict, "model": state dict of plain tensors, ...extra}. Unwraps DDP and
    torch.compile first, so no "module." or "_orig_mod." prefixes ever reach the file."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic(path, {"config": dataclasses.asdict(model.config), "model": state, **(extra or {})})
# --- end shared: save ---


# --- shared: sampling (origin: 01_pretrain.py) ---
# Eager generation stops computing the rows that have finished once they are this share of the rows it
# computes: each drop copies the KV cache, so rows go in batches (256 rows: at most 19 copies). The static
# path (a CUDA graph's) keeps every row: its shapes never change.
DROP_FINISHED = 0.25
# Steps between two looks at which rows have stopped (to end early, or to drop rows), by device. A look
# reads a value back from a GPU, and waits there until all the work queued before it is done: looking
# every step would idle the GPU while Python queues the next. A row that stops between looks repeats its
# stop id, so a look every 16 steps costs at most 15 steps of stop ids at the end. A CPU has no queue to
# drain: it looks every step, and drops rows when it always did (one generator's draws depend on how
# many rows are computed, so a later drop would change the later draws of the rows left).
CHECK_EVERY = {"cpu": 1, "cuda": 16, "mps": 16}


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, stop_ids=(), generator=None,
             share_prefill=False, static=None):
    """Yield new token ids (B,) one step at a time for a batch of prompts, using a KV cache: the
    prompts are read in one forward pass, then each step feeds only the newest tokens.

    prompt_ids: a (B, T) tensor, or B lists of ids of any lengths (shorter ones are left-padded and
    the padding is masked, so each row is generated as if it were alone). temperature 0 is greedy.
    generator: one torch.Generator for the batch, or a list of B, one per row, so that a row's
    samples do not depend on which other rows share its batch. A row that has produced a stop id
    repeats it while the others go on (on the eager path it is soon no longer computed); generation
    stops once every row has stopped, seen within CHECK_EVERY steps. share_prefill: rows with the
    same prompt (a group of samples of one problem) share one reading of it, its KV cache copied to
    each; not where a hook edits such rows differently. On CUDA the whole call runs under bf16
    autocast with a bf16 KV cache, and each step replays a CUDA graph over a static cache of every
    row (static=None: on CUDA, unless the model has forward hooks, which a graph would not run again,
    such as stage 07's edits; static=True takes that path, eagerly, on any device). The model is put
    in eval mode and handed back in the mode it came in."""
    was_training = model.training
    model.eval()
    device = model.embed.weight.device.type
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    static = device == "cuda" and not hooked if static is None else static
    try:   # the autocast also holds while the caller handles a step (the callers here collect ids)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            yield from _generate_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, stop_ids,
                                        generator, share_prefill, static)
    finally:
        model.train(was_training)


def distinct_prompts(prompt_ids):
    """The batch's distinct prompts (lists of ids), and for each row the index of its prompt among
    them: a prompt sampled many times (stage 05's groups, pass@64) is read once."""
    rows = prompt_ids.view(len(prompt_ids), -1).tolist() if torch.is_tensor(prompt_ids) else prompt_ids
    first = {}
    copies = [first.setdefault(tuple(map(int, r)), len(first)) for r in rows]
    return [list(r) for r in first], copies


def left_pad(prompt_ids, device):
    """(B, T) ids with shorter prompts padded on the left, and each row's first real position (None
    when every prompt has the same length)."""
    if torch.is_tensor(prompt_ids):
        return prompt_ids.to(device).view(len(prompt_ids), -1), None
    rows = [list(map(int, p)) for p in prompt_ids]
    T = max(map(len, rows))
    if all(len(r) == T for r in rows):
        return torch.tensor(rows, device=device, dtype=torch.long), None
    idx = torch.tensor([[0] * (T - len(r)) + r for r in rows], device=device, dtype=torch.long)
    return idx, torch.tensor([T - len(r) for r in rows], device=device)


def next_token(logits, temperature, top_k, generator=None, uniform=None):
    """Choose the next id of each row from its logits (B, V): greedy at temperature 0; else drawn
    with `generator`, or, given one uniform number per row (B,), by inverting each row's CDF."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, -1)
    if uniform is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    cdf = probs.cumsum(-1)
    chosen = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).squeeze(-1)
    return chosen.clamp(max=probs.size(-1) - 1)


def grouped_attention(q, k, v, visible):
    """Attention of one new query per row, q (B, H, 1, D), over k, v (B, Hkv, S, D) where visible (B or
    1, S) is True. The H // Hkv query heads that share a key head are read as that head's queries (head
    h reads key head h // (H // Hkv), as in kernels.attention), so the cache is never copied per head."""
    B, H, _, D = q.shape
    y = F.scaled_dot_product_attention(q.view(B, k.size(1), H // k.size(1), D), k, v,
                                       attn_mask=visible[:, None, None, :])
    return y.view(B, H, 1, D)


class StaticKVCache(KVCache):
    """A KVCache whose tensors never change shape or place, so that a CUDA graph can replay a decoding
    step over it: the step writes its token's keys and values in place, at a position counted by a
    tensor on the device (which the step itself advances), and attends to all max_len positions with
    those not yet written, and a row's left padding, masked out. The prompts are read as KVCache
    reads them, at position 0, before any graph is recorded."""

    def __init__(self, config, batch_size, max_len, device, dtype, start=None):
        super().__init__(config, batch_size, max_len, device, dtype, start)
        self.length = torch.zeros((), dtype=torch.long, device=device)

    def attend(self, layer, q, k, v):
        if k.size(2) > 1:   # the prompts
            self.k[layer, :, :, :k.size(2)], self.v[layer, :, :, :k.size(2)] = k, v
            return kernels.attention(q, k, v, key_start=self.start)
        self.k[layer].index_copy_(2, self.length[None], k)
        self.v[layer].index_copy_(2, self.length[None], v)
        keys = torch.arange(self.k.size(3), device=k.device)[None, :]
        first = 0 if self.start is None else self.start[:, None]
        return grouped_attention(q, self.k[layer], self.v[layer], (keys <= self.length) & (keys >= first))


class GraphedStep:
    """step(ids) -> logits, replayed as a CUDA graph: its kernels recorded once, then launched all
    together each call (no Python, no launch per kernel). The first call runs step eagerly, on a side
    stream as PyTorch's CUDA graph notes ask (kernels chosen, workspaces made), then records it; step
    must change no Python state (the static cache counts its length on the GPU). Where recording
    fails, every call runs step eagerly, and the first failure is said once."""
    failed = []

    def __init__(self, step):
        self.step, self.graph = step, None

    def __call__(self, ids):
        if self.graph is not None:
            self.ids.copy_(ids)
            self.graph.replay()
            return self.logits
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self.step(ids)
        torch.cuda.current_stream().wait_stream(side)
        if not GraphedStep.failed:
            self.record(ids)
        return logits

    def record(self, ids):
        self.ids, graph = ids.clone(), torch.cuda.CUDAGraph()
        try:   # the graph casts the weights itself: autocast frees its cached bf16 copies when it ends
            with torch.cuda.graph(graph), torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
                self.logits = self.step(self.ids)
            self.graph = graph
        except RuntimeError as err:
            GraphedStep.failed.append(err)
            print(f"generate: no CUDA graph ({str(err).splitlines()[0][:120]}); decoding eagerly instead")


def prefill(model, prompt_ids, max_new_tokens, share_prefill, static):
    """Read the prompts (with share_prefill, each distinct one once, its cache then copied to the rows
    that share it) into a KV cache (a StaticKVCache if static) in the compute dtype. -> (cache, the
    logits (B, V) of each row's next token, the number of steps there is room for)."""
    device = model.embed.weight.device
    distinct, copies = distinct_prompts(prompt_ids) if share_prefill else (prompt_ids, None)
    idx, start = left_pad(distinct, device)
    max_len = min(idx.size(1) + max_new_tokens, model.rope_cos.size(0))
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else model.embed.weight.dtype
    cache = (StaticKVCache if static else KVCache)(model.config, len(idx), max_len, device, dtype, start)
    logits = model(idx, cache=cache)[:, -1]
    if copies is not None and len(distinct) < len(copies):
        copies = torch.tensor(copies, device=device)
        cache.keep_rows(copies)
        cache.rows = torch.arange(len(copies), device=device)   # each row now holds its own copy
        logits = logits[copies]
    return cache, logits, max_len - idx.size(1)


def _generate_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, stop_ids, generator,
                     share_prefill, static):
    cache, logits, n_steps = prefill(model, prompt_ids, max_new_tokens, share_prefill, static)
    B, device = logits.size(0), logits.device
    uniforms = None
    if isinstance(generator, (list, tuple)) and temperature != 0:
        # Each row's draws for every step, taken up front from its own generator (one call per row,
        # not one per row and step): a row's samples then do not depend on the rest of its batch.
        uniforms = torch.stack([torch.rand(n_steps, generator=g, device=g.device) for g in generator])
        uniforms, generator = uniforms.to(device), None
    step = lambda ids: model(ids[:, None], cache=cache)[:, -1]  # noqa: E731  ids (B,) -> next logits
    step = GraphedStep(step) if static and device.type == "cuda" else step
    stop = torch.tensor(list(stop_ids), device=device, dtype=torch.long)
    every = CHECK_EVERY.get(device.type, 1)
    out = torch.zeros(B, dtype=torch.long, device=device)    # a finished row repeats its stop id
    done = torch.zeros(B, dtype=torch.bool, device=device)   # over the rows still computed (cache.rows)
    for t in range(n_steps):
        uniform = None if uniforms is None else uniforms[:, t]
        next_id = next_token(logits, temperature, top_k, generator, uniform)
        rows = cache.rows
        out = out.index_copy(0, rows, torch.where(done, out[rows], next_id))   # no host sync
        yield out
        done = done | torch.isin(next_id, stop)
        look = t % every == every - 1
        if t == n_steps - 1 or (look and done.all()):
            return
        if look and not static and done.sum() >= DROP_FINISHED * done.numel():
            keep = ~done
            cache.keep_rows(keep)
            next_id, done = next_id[keep], done[keep]
            uniforms = None if uniforms is None else uniforms[keep]
        logits = step(next_id)
# --- end shared: sampling ---


# --- shared: heldout (origin: 05_grpo_reasoning.py) ---
# The multiplications stage 05 keeps for its evaluation, chosen by a hash of the pair (never the world or
# the seed), so stages 01 and 02, which write worked arithmetic, and 05 agree without reading each other.
PRODUCT = re.compile(r"(?<![\d-])(\d+) \* (?=(\d+)(?!\d))")               # "3 * 12", in a step or a sum
PURCHASE = re.compile(r"(?<![\d-])(\d+) [a-z ]+? at (\d+) coins each")   # "3 ropes at 12 coins each"


def reserved_product(a, b):
    """Is a x b (either order) kept for evaluation? One pair in six of the factors 2-12 (14 pairs): every
    factor is still trained, with other partners, but never these products (3 x 12 is one)."""
    a, b = sorted((int(a), int(b)))
    return a >= 2 and b <= 12 and zlib.crc32(f"{a} * {b}".encode("utf-8")) % 6 == 0


def reserved_products(text):
    """The reserved multiplications a text writes out: as 'a * b' or as a purchase of a at b coins each."""
    pairs = PRODUCT.findall(text) + PURCHASE.findall(text)
    return [(int(a), int(b)) for a, b in pairs if reserved_product(a, b)]
# --- end shared: heldout ---


# --- shared: arithmetic (origin: 01_pretrain.py) ---
GOODS = ["lanterns", "ropes", "candles", "apples", "baskets", "bowls", "blankets", "cups", "bells", "pears",
         "maps", "spoons", "jars of honey", "loaves", "nails", "bottles of ink"]   # for the arithmetic


def _step(a, op, b):
    """One worked step, 'a op b = c', and its value c."""
    c = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {c}", c


def arithmetic_problem(world, rng):
    """A word problem set in the world: (question, step lines, answer).

    1-3 steps of + - *, small numbers, each step 'a op b = c'; stage 02 writes them as the question,
    the steps one per line, then 'Answer: N'."""
    # Operands stay small (products of one- and two-digit numbers, totals in the hundreds): a
    # model of a few million parameters can learn to carry out such steps, not long multiplication.
    # Writing every step out is the point: stage 05 rewards reaching the checkable final answer,
    # and a model that has seen worked steps in pretraining has a chance to reach it.
    people = world["people"]
    p = rng.choice(people)
    name, she = p["name"], p["pronoun"]
    kind = rng.randrange(8)
    if kind == 0:
        n, price, item = rng.randint(2, 9), rng.randint(2, 15), rng.choice(GOODS)
        q = f"{name} buys {n} {item} at {price} coins each. How many coins does {she} pay?"
        steps = [_step(n, "*", price)]
    elif kind == 1:
        (i1, i2), n1, p1, n2, p2 = rng.sample(GOODS, 2), *(rng.randint(2, 9) for _ in range(4))
        q = (f"{name} buys {n1} {i1} at {p1} coins each and {n2} {i2} at {p2} coins each. "
             f"How many coins does {she} pay?")
        s1, s2 = _step(n1, "*", p1), _step(n2, "*", p2)
        steps = [s1, s2, _step(s1[1], "+", s2[1])]
    elif kind == 2:
        n, price, item = rng.randint(2, 6), rng.randint(2, 9), rng.choice(GOODS)
        have = n * price + rng.randint(1, 40)
        q = (f"{name} has {have} coins and buys {n} {item} at {price} coins each. "
             f"How many coins does {she} have left?")
        s1 = _step(n, "*", price)
        steps = [s1, _step(have, "-", s1[1])]
    elif kind == 3:
        x, y, item = rng.randint(3, 20), rng.randint(3, 20), rng.choice(GOODS)
        give = rng.randint(1, x + y - 1)
        other = rng.choice(people)["name"]
        q = (f"{name} packs {x} {item} in the morning and {y} in the afternoon, then gives {give} "
             f"to {other}. How many {item} does {she} have now?")
        s1 = _step(x, "+", y)
        steps = [s1, _step(s1[1], "-", give)]
    elif kind == 4:
        cr = rng.choice(world["creatures"])
        each, herd, days = rng.randint(2, 6), rng.randint(2, 5), rng.randint(2, 7)
        q = (f"A {cr['name']} eats {each} {cr['diet']} a day. {name} looks after {herd} of them. "
             f"How many {cr['diet']} do they eat in {days} days?")
        s1 = _step(each, "*", herd)
        steps = [s1, _step(s1[1], "*", days)]
    elif kind == 5:
        org = p["guild"]
        t1, t2 = rng.sample(world["towns"], 2)
        x, y, dues = rng.randint(3, 20), rng.randint(3, 20), rng.randint(2, 9)
        q = (f"The {org} has {x} members in {t1['name']} and {y} members in {t2['name']}. Each member pays "
             f"{dues} coins a year. How many coins does the {org} collect in a year?")
        s1 = _step(x, "+", y)
        steps = [s1, _step(s1[1], "*", dues)]
    elif kind == 6:
        x, y, z = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 20)
        there = rng.choice(world["towns"])["name"]
        q = (f"{name} walks {x} miles from {p['home']} to {there}, then {y} miles to the river, "
             f"then {z} miles home. How many miles does {she} walk in all?")
        s1 = _step(x, "+", y)
        steps = [s1, _step(s1[1], "+", z)]
    else:
        # The sale brings in at least 4 * 8 = 32 coins and the purchase costs at most 5 * 6 = 30,
        # so the answer is never negative.
        n1, p1, n2, p2 = rng.randint(4, 9), rng.randint(8, 15), rng.randint(2, 5), rng.randint(2, 6)
        i1, i2 = rng.sample(GOODS, 2)
        q = (f"{name} sells {n1} {i1} at {p1} coins each and buys {n2} {i2} at {p2} coins each. "
             f"How many coins does {she} have left from the sale?")
        s1, s2 = _step(n1, "*", p1), _step(n2, "*", p2)
        steps = [s1, s2, _step(s1[1], "-", s2[1])]
    return q, [line for line, _ in steps], steps[-1][1]
# --- end shared: arithmetic ---


if __name__ == "__main__":
    main()
