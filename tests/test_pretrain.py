"""Stage 01: tokenizer, model, data, checkpoints, resume, DDP and bad input."""
import contextlib
import errno
import http.server
import json
import os
import random
import subprocess
import threading

import pytest
import torch

from conftest import PY, ROOT, load_stage, run_script

P = load_stage("01_pretrain")


def run_stage(*args):
    return run_script("01_pretrain.py", *args)


def history(out):
    return json.loads((out / "metrics.json").read_text())["history"]


@pytest.fixture(scope="module")
def world():
    return P.make_world(12, seed=3)


@pytest.fixture(scope="module")
def enc(world):
    texts = [P.document(world, i, 3) for i in range(200)]
    return P.make_encoding("test", P.train_bpe(texts, 512))


def tiny_model(vocab=300, n_experts=0, seed=0):
    torch.manual_seed(seed)
    cfg = P.GPTConfig(vocab_size=vocab, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_hidden=96,
                      seq_len=32, n_experts=n_experts, top_k=2, moe_every=1)
    model = P.GPT(cfg)
    model.init_weights(seed)
    return model.eval()


# ---------------------------------------------------------------- tokenizer

def test_bpe_round_trips_random_unicode(enc):
    rng = random.Random(0)
    alphabets = [(0x20, 0x7e), (0xa0, 0x24f), (0x370, 0x3ff), (0x4e00, 0x4fff), (0x1f300, 0x1f64f), (0x0, 0x1f)]
    for _ in range(300):
        chars = []
        for _ in range(rng.randint(0, 40)):
            lo, hi = rng.choice(alphabets)
            chars.append(chr(rng.randint(lo, hi)))
        text = "".join(chars)
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_bpe_learns_frequent_words_and_is_deterministic(world, enc):
    texts = [P.document(world, i, 3) for i in range(200)]
    again = P.make_encoding("test", P.train_bpe(texts, 512))
    assert again._mergeable_ranks == enc._mergeable_ranks
    name = " " + world["people"][0]["name"].split()[0]
    assert len(enc.encode_ordinary(name)) <= 2        # a name the corpus repeats is one or two tokens
    assert enc.n_vocab == 512


def test_special_tokens_never_come_from_ordinary_text(enc):
    special_ids = {enc.encode_single_token(t) for t in P.SPECIAL_TOKENS}
    text = "".join(P.SPECIAL_TOKENS) + " <|user|> hello <|end|><|assistant|>"
    ids = enc.encode_ordinary(text)
    assert not special_ids & set(ids)
    assert enc.decode(ids) == text
    assert len(special_ids) == len(P.SPECIAL_TOKENS) and min(special_ids) == enc.n_vocab - len(P.SPECIAL_TOKENS)


def test_tokenizer_json_round_trip(enc, tmp_path):
    (tmp_path / "tokenizer.json").write_text(P.tokenizer_to_json(enc))
    loaded = P.load_tokenizer(tmp_path)
    text = "Orla Penn was born in 812. <|user|> 🦊"
    assert loaded.encode_ordinary(text) == enc.encode_ordinary(text)
    assert loaded.encode_single_token("<|end|>") == enc.encode_single_token("<|end|>")


def test_stock_tokenizer_needs_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache: must not reach the network
    with pytest.raises(P.DataError, match="not in tiktoken's local cache"):
        P.stock_encoding("gpt2")


# ---------------------------------------------------------------- model

@pytest.mark.parametrize("n_experts", [0, 4])
def test_future_tokens_do_not_change_past_logits(n_experts):
    model = tiny_model(n_experts=n_experts)
    idx = torch.randint(0, 300, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3   # and the future ones do change


def test_logits_at_some_positions_are_those_positions_of_the_full_pass():
    """`at` keeps the positions it marks, in row-major order, each with its own logits: a mask
    misread as positions, transposed, or applied before the blocks would give other rows."""
    model = tiny_model()
    idx = torch.randint(0, 300, (3, 9))
    at = torch.zeros(3, 9, dtype=torch.bool)
    at[0, 2], at[0, 7], at[2, 0], at[2, 8] = True, True, True, True
    with torch.no_grad():
        full, some = model(idx), model(idx, at=at)
    assert some.shape == (4, full.size(-1))
    torch.testing.assert_close(some, full[[0, 0, 2, 2], [2, 7, 0, 8]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_experts", [0, 4])
def test_kv_cache_matches_full_recomputation(n_experts):
    model = tiny_model(n_experts=n_experts)
    prompt = torch.randint(0, 300, (3, 7))
    cached = torch.stack(list(P.generate(model, prompt, 12, temperature=0)), dim=1)
    seq = prompt
    for _ in range(12):  # the slow way: recompute the whole sequence for every new token
        with torch.no_grad():
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq[:, 7:])
    # and the cached logits themselves match the full forward pass position by position
    cache = P.KVCache(model.config, 3, 19, "cpu", torch.float32)
    with torch.no_grad():
        step_logits = [model(seq[:, :7], cache=cache)[:, -1]] + [model(seq[:, t:t + 1], cache=cache)[:, -1] for t in range(7, 18)]
        full = model(seq[:, :18])[:, 6:]
    torch.testing.assert_close(torch.stack(step_logits, 1), full, rtol=1e-4, atol=1e-4)


def test_generate_stops_at_stop_token_and_samples_reproducibly():
    model = tiny_model()
    prompt = torch.randint(0, 300, (1, 5))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = torch.cat(list(P.generate(model, prompt, 10, temperature=1.0, top_k=20, generator=g1)))
    b = torch.cat(list(P.generate(model, prompt, 10, temperature=1.0, top_k=20, generator=g2)))
    assert torch.equal(a, b) and len(a) == 10
    stop = int(a[3])
    c = torch.cat(list(P.generate(model, prompt, 10, temperature=1.0, top_k=20,
                                  generator=torch.Generator().manual_seed(1), stop_ids=[stop])))
    assert int(c[-1]) == stop and len(c) == list(a).index(stop) + 1
    model.train()                      # generation must hand the model back in the mode it came in
    list(P.generate(model, prompt, 3, temperature=0))
    assert model.training


@pytest.mark.parametrize("n_experts", [0, 4])
def test_batched_prompts_of_different_lengths_sample_as_if_alone(n_experts):
    """Left padding is invisible: a batch of prompts of lengths 3, 9 and 6 gives each row the tokens
    it gets when generated alone, greedy and sampled (each row with its own generator)."""
    model = tiny_model(n_experts=n_experts)
    torch.manual_seed(3)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 9, 6)]
    for temperature in (0, 1.0):
        def gens():
            return [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]
        batched = torch.stack(list(P.generate(model, prompts, 15, temperature, generator=gens())), 1)
        for i, (prompt, g) in enumerate(zip(prompts, gens())):
            alone = torch.stack(list(P.generate(model, [prompt], 15, temperature, generator=[g])), 1)
            assert batched[i].tolist() == alone[0].tolist(), (temperature, i)
    # and the padded logits match the unpadded ones, not just their argmax
    cache = P.KVCache(model.config, 2, 9, "cpu", torch.float32, start=torch.tensor([6, 0]))
    idx = torch.tensor([[0] * 6 + prompts[0], prompts[1]])
    with torch.no_grad():
        padded = model(idx, cache=cache)[0, -3:]
        alone = model(torch.tensor([prompts[0]]))[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_rows_that_stop_early_are_dropped_and_the_rest_sample_as_if_alone():
    """Once a quarter of the rows have produced a stop id they are no longer computed; the others
    go on exactly as they would alone (greedy, and sampled with a generator per row), and a
    finished row repeats its stop id."""
    model = tiny_model()
    torch.manual_seed(4)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 9, 6, 5)]
    batch_sizes = []
    model.embed.register_forward_hook(lambda m, inputs, out: batch_sizes.append(out.size(0)))
    for temperature in (0, 1.0):
        def gens():
            return [torch.Generator().manual_seed(200 + i) for i in range(len(prompts))]
        free = torch.stack(list(P.generate(model, prompts, 12, temperature, generator=gens())), 1)
        stops = {int(free[1, 2]), int(free[3, 5])}
        batch_sizes.clear()
        batched = torch.stack(list(P.generate(model, prompts, 12, temperature, generator=gens(),
                                              stop_ids=stops)), 1).tolist()
        assert min(batch_sizes) < len(prompts), temperature       # finished rows were dropped
        for i, (prompt, g) in enumerate(zip(prompts, gens())):
            alone = torch.stack(list(P.generate(model, [prompt], 12, temperature, generator=[g],
                                                stop_ids=stops)), 1)[0].tolist()
            end = next((k + 1 for k, t in enumerate(alone) if t in stops), len(alone))
            assert batched[i][:end] == alone[:end], (temperature, i)
            assert all(t == alone[end - 1] for t in batched[i][end:]), (temperature, i)


def test_per_row_generators_sample_the_distribution():
    """Inverse-CDF sampling from one uniform number per row draws tokens at their probabilities."""
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]])).expand(4000, 3)
    uniform = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(P.next_token(logits, 1.0, None, uniform=uniform), minlength=3).float() / 4000
    torch.testing.assert_close(counts, torch.tensor([0.1, 0.6, 0.3]), atol=0.03, rtol=0)


# ---------------------------------------------------------------- generation against a frozen copy
# Stage 01's generation as it was before issue 35 (commit 4026170), the reference the new paths must
# match token for token: its KVCache and loop verbatim, but for the two methods the model now calls,
# which hold the lines that GPT.forward (positions) and Attention.forward (attend) ran then. It draws
# with the stage's own next_token, which issue 35 left as it was.

class FrozenKVCache:
    def __init__(self, config, batch_size, max_len, device, dtype, start=None):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.start = start
        self.rows = torch.arange(batch_size, device=device)

    def keep_rows(self, keep):
        self.k, self.v, self.rows = self.k[:, keep], self.v[:, keep], self.rows[keep]
        if self.start is not None:
            self.start = self.start[keep]

    def positions(self, T):
        t0 = self.length
        if self.start is None:
            return torch.arange(t0, t0 + T)[None, :]   # GPT.forward sliced rope_cos[t0:t0 + T]: the same rows
        return (torch.arange(t0, t0 + T)[None, :] - self.start[:, None]).clamp(min=0)

    def attend(self, layer, q, k, v):
        t0, t1 = self.length, self.length + k.size(2)
        self.k[layer, :, :, t0:t1], self.v[layer, :, :, t0:t1] = k, v
        k, v = self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]
        return P.kernels.attention(q, k, v, causal=True, key_start=self.start)


@torch.no_grad()
def frozen_generate(model, prompt_ids, max_new_tokens, temperature, stop_ids=(), generator=None, top_k=None,
                    drop_finished=0.25):   # DROP_FINISHED as it was; a test sets it out of reach
    rows = [list(map(int, p)) for p in prompt_ids]
    T = max(map(len, rows))
    idx = torch.tensor([[0] * (T - len(r)) + r for r in rows], dtype=torch.long)
    start = None if all(len(r) == T for r in rows) else torch.tensor([T - len(r) for r in rows])
    max_len = min(idx.size(1) + max_new_tokens, model.rope_cos.size(0))
    n_steps = max_len - idx.size(1)
    uniforms = None
    if isinstance(generator, (list, tuple)) and temperature != 0:
        uniforms = torch.stack([torch.rand(n_steps, generator=g, device=g.device) for g in generator])
        uniforms, generator = uniforms.to(idx.device), None
    cache = FrozenKVCache(model.config, idx.size(0), max_len, idx.device, model.embed.weight.dtype, start)
    logits = model(idx, cache=cache)[:, -1]
    stop = torch.tensor(list(stop_ids), device=idx.device, dtype=torch.long)
    out = torch.zeros(idx.size(0), dtype=torch.long, device=idx.device)
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for step in range(n_steps):
        uniform = None if uniforms is None else uniforms[:, step]
        next_id = P.next_token(logits, temperature, top_k, generator, uniform)
        out[cache.rows[~done]] = next_id[~done]
        yield out.clone()
        done |= torch.isin(next_id, stop)
        if done.all() or step == n_steps - 1:
            return
        if done.sum() >= drop_finished * done.numel():
            keep = ~done
            cache.keep_rows(keep)
            next_id, done = next_id[keep], done[keep]
            uniforms = None if uniforms is None else uniforms[keep]
        logits = model(next_id[:, None], cache=cache)[:, -1]


# Eight rows from five prompts of lengths 3 to 9 (three of them read twice or more), and the draws.
def frozen_case(seed=5):
    torch.manual_seed(seed)
    base = [torch.randint(0, 300, (n,)).tolist() for n in (3, 9, 6, 5, 7)]
    return [base[0], base[1], base[0], base[2], base[3], base[1], base[4], base[0]]


DRAWS = {"greedy": (0, lambda n: None),
         "a generator per row": (1.0, lambda n: [torch.Generator().manual_seed(50 + i) for i in range(n)]),
         "one generator": (1.0, lambda n: torch.Generator().manual_seed(9)),
         "torch's global generator": (1.0, lambda n: None)}


def steps_of(gen_fn, model, prompts, temperature, draws, **kw):
    torch.manual_seed(0)   # for torch's global generator
    return [s.tolist() for s in gen_fn(model, prompts, 14, temperature, generator=draws(len(prompts)), **kw)]


def stops_met_at_different_steps(model, prompts, temperature, draws):
    """A stop id for every row: its own token at one of steps 1 to 7 when run without stops, so rows
    stop at different steps (and are dropped) and, unless a drop moves the draws, all before the end."""
    free = steps_of(frozen_generate, model, prompts, temperature, draws)
    return {free[step][row] for row, step in enumerate((1, 3, 5, 7, 2, 4, 6, 3))}


@pytest.mark.parametrize("draw", DRAWS)
@pytest.mark.parametrize("share_prefill", [False, True])
def test_generation_on_the_cpu_is_todays_token_for_token(draw, share_prefill):
    """The default path on the CPU (eager, every step looked at, fp32 cache) yields exactly the
    steps the frozen copy yields, finished rows dropped, for every kind of draw; and so it does when
    the rows that share a prompt share its prefill (five prompts read, their caches copied to eight)."""
    model, prompts = tiny_model(), frozen_case()
    temperature, draws = DRAWS[draw]
    stops = stops_met_at_different_steps(model, prompts, temperature, draws)
    old = steps_of(frozen_generate, model, prompts, temperature, draws, stop_ids=stops)
    sizes = []
    model.embed.register_forward_hook(lambda m, inputs, out: sizes.append(out.size(0)))
    assert steps_of(P.generate, model, prompts, temperature, draws, stop_ids=stops,
                    share_prefill=share_prefill) == old
    assert sizes[0] == (5 if share_prefill else 8) and sizes[1] == 8 and min(sizes) < 8   # rows dropped


@pytest.mark.parametrize("draw", ["greedy", "a generator per row"])
def test_looking_every_few_steps_changes_no_token(draw, monkeypatch):
    """As on a GPU, the loop looks at which rows stopped only every 5th step: rows are dropped only
    then, generation ends at the first look after the last stop, and the steps the frozen copy
    yields are yielded unchanged, the few after them holding only stop ids."""
    monkeypatch.setitem(P.CHECK_EVERY, "cpu", 5)
    model, prompts = tiny_model(), frozen_case()
    temperature, draws = DRAWS[draw]
    stops = stops_met_at_different_steps(model, prompts, temperature, draws)
    old = steps_of(frozen_generate, model, prompts, temperature, draws, stop_ids=stops)
    sizes = []
    model.embed.register_forward_hook(lambda m, inputs, out: sizes.append(out.size(0)))
    new = steps_of(P.generate, model, prompts, temperature, draws, stop_ids=stops)
    assert len(old) < 14 and len(new) == min(14, -(-len(old) // 5) * 5)   # ends at the first look after
    assert new[:len(old)] == old and all(step == old[-1] for step in new[len(old):])
    decoded = sizes[1:]   # the rows computed after each step: fewer only after a look (steps 4, 9)
    changes = [k for k in range(1, len(decoded)) if decoded[k] != decoded[k - 1]]
    assert changes and all(k % 5 == 4 for k in changes), decoded


def test_looking_every_few_steps_keeps_one_generators_draws_while_no_row_is_dropped(monkeypatch):
    """One generator for the batch draws for every row computed, so only the drop moves its draws:
    with no drop, looking every 5th step yields the frozen copy's steps (then stop ids)."""
    monkeypatch.setitem(P.CHECK_EVERY, "cpu", 5)
    monkeypatch.setattr(P, "DROP_FINISHED", 2.0)   # never
    model, prompts = tiny_model(), frozen_case()
    temperature, draws = DRAWS["one generator"]
    stops = stops_met_at_different_steps(model, prompts, temperature, draws)
    new = steps_of(P.generate, model, prompts, temperature, draws, stop_ids=stops)
    old = steps_of(frozen_generate, model, prompts, temperature, draws, stop_ids=stops, drop_finished=2.0)
    assert len(new) > len(old) and new[:len(old)] == old and all(step == old[-1] for step in new[len(old):])


@pytest.mark.parametrize("draw", ["greedy", "a generator per row"])
@pytest.mark.parametrize("n_experts", [0, 4])
def test_the_static_cache_path_gives_todays_tokens(draw, n_experts):
    """The path a GPU graphs (a cache of fixed shape written in place, every row kept, all max_len
    positions attended with the unwritten ones masked), run eagerly on the CPU: the frozen copy's
    tokens, greedy and sampled, while the frozen copy drops rows; every step computes all 8 rows
    (copied from the five prompts read)."""
    model, prompts = tiny_model(n_experts=n_experts), frozen_case()
    temperature, draws = DRAWS[draw]
    stops = stops_met_at_different_steps(model, prompts, temperature, draws)
    old = steps_of(frozen_generate, model, prompts, temperature, draws, stop_ids=stops)
    sizes = []
    model.embed.register_forward_hook(lambda m, inputs, out: sizes.append(out.size(0)))
    new = steps_of(P.generate, model, prompts, temperature, draws, stop_ids=stops, share_prefill=True,
                   static=True)
    assert new == old and sizes == [5] + [8] * (len(sizes) - 1)


def test_the_static_cache_reads_each_step_as_the_eager_cache_does():
    """Token by token through a padded batch, the logits of the static cache (every position attended,
    the unwritten and the padding masked) are the eager cache's: not only their argmax. The weights are
    scaled up so that attention is far from uniform and a wrong key would show."""
    model, prompts = tiny_model(), frozen_case()[:4]
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith(("wq.weight", "wkv.weight")):
                w.mul_(20)
        idx, start = P.left_pad(prompts, "cpu")
        feed = torch.randint(0, 300, (len(prompts), 6))
        reads = []
        for cache_class in (P.KVCache, P.StaticKVCache):
            cache = cache_class(model.config, len(prompts), idx.size(1) + 6, "cpu", torch.float32, start)
            steps = [model(idx, cache=cache)] + [model(feed[:, t:t + 1], cache=cache) for t in range(6)]
            reads.append(torch.cat(steps, 1))
    torch.testing.assert_close(reads[1], reads[0], rtol=1e-5, atol=1e-5)


def test_the_static_cache_path_with_one_generator_where_no_row_is_dropped():
    """With one generator the frozen copy's draws follow its drops, which the static path never
    makes: without stop ids (no drop) the tokens are the same."""
    model, prompts = tiny_model(), frozen_case()
    temperature, draws = DRAWS["one generator"]
    new = steps_of(P.generate, model, prompts, temperature, draws, static=True)
    assert new == steps_of(frozen_generate, model, prompts, temperature, draws)


def test_the_kv_cache_is_kept_in_the_compute_dtype():
    """Under bf16 autocast (what generate enters on CUDA) the cache is bf16, so no layer casts it
    again at every step; without autocast (the CPU) it is the model's fp32."""
    model, prompts = tiny_model(), frozen_case()
    for static in (False, True):
        with torch.no_grad():
            assert P.prefill(model, prompts, 4, False, static)[0].k.dtype == torch.float32
            with torch.autocast("cpu", dtype=torch.bfloat16):
                cache, logits, _ = P.prefill(model, prompts, 4, False, static)
        assert cache.k.dtype == cache.v.dtype == torch.bfloat16 and logits.dtype == torch.float32


def test_masked_targets_are_ignored():
    model = tiny_model()
    idx, targets = torch.randint(0, 300, (2, 10)), torch.randint(0, 300, (2, 10))
    masked = targets.clone()
    masked[:, :5] = -1
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 300), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(model(idx, masked), expected)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(n_experts=4)
    P.save_model(model, tmp_path / "model.pt", {"step": 7})
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    assert raw["step"] == 7 and not any(k.startswith(("module.", "_orig_mod.")) for k in raw["model"])
    loaded, _ = P.load_model(tmp_path)
    idx = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded.eval()(idx))


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    P.write_atomic(path, {"step": 1})

    def disk_full(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(P.torch, "save", disk_full)
    with pytest.raises(OSError):
        P.write_atomic(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert not (tmp_path / "model.pt.tmp").exists()


def test_load_model_missing_or_corrupt_gives_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="run 01_pretrain.py first"):
        P.load_model(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a checkpoint this code trusts"):
        P.load_model(tmp_path)


# ---------------------------------------------------------------- data

def test_token_rows_resume_mid_stream(world, enc):
    source = P.DocumentSource(world, seed=5)
    straight = P.TokenRows(source, enc, seq_len=32, chunk_docs=4)
    expected = [straight.batch(r, 3)[0] for r in range(0, 30, 3)]
    first = P.TokenRows(source, enc, seq_len=32, chunk_docs=4)
    got = [first.batch(r, 3)[0] for r in range(0, 15, 3)]
    second = P.TokenRows(source, enc, seq_len=32, chunk_docs=4)
    second.load_state_dict(first.state_dict())
    got += [second.batch(r, 3)[0] for r in range(15, 30, 3)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_data_workers_give_the_same_rows_and_resume(world, enc):
    """Worker processes generate chunks ahead; the rows, and the saved position, must not change."""
    source = P.DocumentSource(world, seed=5)
    straight = P.TokenRows(source, enc, seq_len=32, chunk_docs=4)
    expected = [straight.batch(r, 3)[0] for r in range(0, 60, 3)]
    first = P.TokenRows(source, enc, seq_len=32, chunk_docs=4, workers=2)
    got = [first.batch(r, 3)[0] for r in range(0, 30, 3)]
    state = first.state_dict()
    straight_half = P.TokenRows(source, enc, seq_len=32, chunk_docs=4)
    [straight_half.batch(r, 3) for r in range(0, 30, 3)]
    assert {k: v for k, v in state.items() if k != "buffer"} == \
        {k: v for k, v in straight_half.state_dict().items() if k != "buffer"}
    assert torch.equal(state["buffer"], straight_half.state_dict()["buffer"])
    first.close()
    second = P.TokenRows(source, enc, seq_len=32, chunk_docs=4, workers=1)
    second.load_state_dict(state)
    got += [second.batch(r, 3)[0] for r in range(30, 60, 3)]
    second.close()
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(expected, got))


def test_rows_start_with_bos_and_targets_shift_by_one(world, enc):
    rows = P.TokenRows(P.DocumentSource(world, seed=5), enc, seq_len=16, chunk_docs=2)
    x, y = rows.batch(0, 2)
    assert x[0, 0] == enc.encode_single_token("<|bos|>")
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_user_text_file_folder_and_bad_input(tmp_path):
    (tmp_path / "a.txt").write_text("First story.\n\n\nSecond story.", encoding="utf-8")
    sub = tmp_path / "more"
    sub.mkdir()
    (sub / "b.md").write_text("Third.", encoding="utf-8")
    assert P.read_user_text(tmp_path / "a.txt") == ["First story.", "Second story."]
    assert P.read_user_text(tmp_path) == ["First story.", "Second story.", "Third."]
    with pytest.raises(P.DataError, match="no such file"):
        P.read_user_text(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(P.DataError, match="not UTF-8 text .byte 0xe9 at offset 3"):
        P.read_user_text(tmp_path / "latin1.txt")


def test_tinystories_download_from_local_server(tmp_path):
    served = tmp_path / "srv"
    served.mkdir()
    (served / "stories.txt").write_text("Once upon a time.\n<|endoftext|>\nThe end came.\n", encoding="utf-8")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(served), **k)

        def log_message(self, *a):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/stories.txt"
        docs = P.fetch_tinystories(url, cache_dir=tmp_path / "cache")
        assert docs == ["Once upon a time.", "The end came."]
        assert len(list((tmp_path / "cache").glob("*.txt"))) == 1
        # Stopped and closed: a closed port refuses at once; one left listening would queue the
        # request unanswered until urlopen's 60 s timeout.
        server.shutdown()
        server.server_close()
        assert P.fetch_tinystories(url, cache_dir=tmp_path / "cache") == docs   # served from the cache
        with pytest.raises(P.DataError, match="could not download"):
            P.fetch_tinystories(url + "x", cache_dir=tmp_path / "cache2")
    finally:
        server.server_close()


def test_probe_scoring_wants_the_whole_answer():
    assert P.completes_with(" Penford.", "Penford") and P.completes_with(" Penford", "Penford")
    assert P.completes_with(" reed beds are home", "reed beds")
    assert not P.completes_with(" Penfordshire", "Penford")      # a longer name is a different town
    assert not P.completes_with(" Pen", "Penford") and not P.completes_with("Penford", "Penford")


def test_learning_rate_schedules():
    lr = [P.learning_rate(s, 100, 1.0, 0.1, "cosine") for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0) and lr[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))
    wsd = [P.learning_rate(s, 100, 1.0, 0.1, "wsd") for s in range(100)]
    assert wsd[50] == 1.0 and wsd[79] == 1.0 and wsd[99] == pytest.approx(0.05)


def test_bits_per_byte_on_hand_values():
    """A model with uniform logits over 4 tokens pays ln 4 nats = 2 bits per token. Targets 0, 1, 2, 3
    stand for 1, 2, 0 (special) and 3 bytes: 3 text tokens x 2 bits over 6 bytes = 1 bit per byte."""
    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, 4)
    targets = torch.tensor([[0, 1, 2, 3]])
    bpb = P.bits_per_byte(Uniform(), torch.zeros_like(targets), targets, torch.tensor([1.0, 2.0, 0.0, 3.0]), 8,
                          contextlib.nullcontext())
    assert bpb == pytest.approx(1.0)


def test_parameter_flop_and_mfu_accounting_on_hand_values():
    config = P.GPTConfig(vocab_size=10, n_layer=2, n_embd=8, n_head=2, n_kv_head=1, mlp_hidden=16, seq_len=8,
                         n_experts=4, top_k=2, moe_every=2)
    # embed 80 + lm_head 80 + final norm 8; per block two norms 16, wq 64, wkv 8 x 2 x 1 x 4 = 64, wo 64;
    # block 0 a SwiGLU 3 x 8 x 16 = 384; block 1 a router 32 and 4 experts of 384.
    total, active = P.count_parameters(P.GPT(config))
    assert total == 168 + 2 * 208 + 384 + 32 + 4 * 384 == 2536
    assert active == total - 80 - 2 * 384      # no embedding lookup; only top_k = 2 of 4 experts run
    assert P.flops_per_token(config, 100) == 6 * 100 + 12 * 2 * 8 * 8
    assert P.mfu_percent(1000, 1e9, 1e12, 2) == pytest.approx(50.0)   # 1e12 FLOP/s of two 1e12 GPUs
    assert P.pretraining_loss(2.0, 0.5, 0.01) == pytest.approx(2.005)


def test_throughput_is_the_median_step_without_the_first_ten():
    # 10 slow steps (compilation) then 15 steps of 1..15 s: the median of those is 8 s.
    history = [{"step_seconds": 100.0}] * 10 + [{"step_seconds": float(t)} for t in range(1, 16)]
    assert P.training_throughput(history, 800) == pytest.approx(100.0)
    # a short run keeps every step (median of 1..5 is 3); a resumed run's old rows have no timing
    assert P.training_throughput([{"loss": 1.0}] + [{"step_seconds": float(t)} for t in range(1, 6)], 6) == 2.0


# ---------------------------------------------------------------- whole runs

def test_tiny_run_lowers_loss_and_writes_the_stage_contract(tiny_pretrain):
    out, result = tiny_pretrain
    for name in ("model.pt", "tokenizer.json", "world.json", "metrics.json", "loss.png", "report.md"):
        assert (out / name).exists(), name
    assert not (out / "train_state.pt").exists()
    h = history(out)
    first, last = sum(r["loss"] for r in h["train"][:3]) / 3, sum(r["loss"] for r in h["train"][-3:]) / 3
    assert last < first - 1.0
    assert h["val"][-1]["val_bpb"] < h["val"][0]["val_bpb"]
    assert "fact completion" in result.stdout
    model, ckpt = P.load_model(out)
    assert ckpt["config"]["vocab_size"] == P.load_tokenizer(out).n_vocab


def test_resume_continues_exactly(tiny_pretrain, tmp_path):
    out, _ = tiny_pretrain
    first = run_stage("--preset", "tiny", "--out", str(tmp_path), "--stop_after_step", "13")
    assert first.returncode == 0 and (tmp_path / "train_state.pt").exists(), first.stderr[-2000:]
    assert not (tmp_path / "model.pt").exists()
    again = run_stage("--preset", "tiny", "--out", str(tmp_path))      # forgot --resume: refused
    assert again.returncode == 1 and "unfinished run" in again.stderr and "Traceback" not in again.stderr
    other = run_stage("--preset", "tiny", "--out", str(tmp_path), "--resume", "--depth", "3")
    assert other.returncode == 1 and "--depth 2 (now 3)" in other.stderr
    second = run_stage("--preset", "tiny", "--out", str(tmp_path), "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    assert [r["loss"] for r in history(tmp_path)["train"]] == [r["loss"] for r in history(out)["train"]]
    a = torch.load(out / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_with_data_workers_matches_without(tmp_path, tiny_pretrain):
    """The whole training loop with two data worker processes: the same batches, so the same losses."""
    run = run_stage("--preset", "tiny", "--data_workers", "2", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    assert [r["loss"] for r in history(tmp_path)["train"]] == [r["loss"] for r in history(tiny_pretrain[0])["train"]]


def test_two_process_ddp_matches_one_process(tmp_path):
    common = ["--preset", "tiny", "--steps", "4", "--eval_every", "100", "--probe_limit", "2"]
    single = run_stage(*common, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-2000:]
    assert "grad accumulation 2 x 1 rank(s)" in single.stdout
    command = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "01_pretrain.py"), *common, "--out", str(tmp_path / "two")]
    for attempt in range(2):  # torchrun picks a free port and can lose it to another process: one retry for that
        ddp = subprocess.run(command, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if ddp.returncode == 0 or "ddress already in use" not in ddp.stderr + ddp.stdout:
            break
    assert ddp.returncode == 0, ddp.stdout[-1500:] + ddp.stderr[-3000:]
    assert "grad accumulation 1 x 2 rank(s)" in ddp.stdout
    one, two = history(tmp_path / "one")["train"], history(tmp_path / "two")["train"]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    wa = torch.load(tmp_path / "one" / "model.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two" / "model.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_bad_data_is_one_sentence_and_nothing_is_written(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe binary")
    for flag, expected in ((str(tmp_path / "nope.txt"), "no such file"), (str(bad), "not UTF-8")):
        result = run_stage("--preset", "tiny", "--out", str(tmp_path / "out"), "--data", flag)
        assert result.returncode == 1 and expected in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    real_forward, calls = P.GPT.forward, []

    def forward(self, idx, targets=None, cache=None):
        out = real_forward(self, idx, targets, cache)
        if targets is not None:
            calls.append(1)
            if len(calls) > 2 * 12:       # micro-batches of steps 0..11 are fine, then NaN
                return out * float("nan")
        return out
    monkeypatch.setattr(P.GPT, "forward", forward)
    with pytest.raises(SystemExit) as stop:
        P.main(["--preset", "tiny", "--out", str(tmp_path), "--device", "cpu"])
    assert stop.value.code == 1
    assert "loss became nan at step 12" in capsys.readouterr().err
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["step"] == 10           # the last periodic checkpoint, untouched
    assert not (tmp_path / "model.pt").exists()


def test_full_disk_on_save_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    real_save, saves = torch.save, []

    def save(obj, f, *a, **k):
        saves.append(1)
        if len(saves) == 2:               # the step-20 checkpoint finds the disk full, and torch says so
            open(f, "wb").write(b"half a file")   # as a RuntimeError, not an OSError
            raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed "
                               "writing file data/0: file write failed")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(P.torch, "save", save)
    with pytest.raises(SystemExit) as stop:
        P.main(["--preset", "tiny", "--out", str(tmp_path), "--device", "cpu"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "file write failed" in errors[0] and "Traceback" not in err, err[-500:]
    monkeypatch.undo()
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["step"] == 10
    assert not (tmp_path / "train_state.pt.tmp").exists()


def test_tiny_moe_run_trains_and_balances(tmp_path):
    result = run_stage("--preset", "tiny", "--out", str(tmp_path), "--n_experts", "4", "--moe_every", "1",
                       "--eval_every", "100", "--probe_limit", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 experts top-2" in result.stdout
    losses = [r["loss"] for r in history(tmp_path)["train"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0
    state = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    bias = state["blocks.0.mlp.router_bias"]
    assert bias.shape == (4,) and bias.abs().sum() > 0   # the aux-loss-free balancing moved the router bias


def test_stream_stats_counts_distinct_documents(tmp_path):
    result = run_stage("--preset", "tiny", "--out", str(tmp_path / "out"), "--stream_stats", "2000")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2,000 documents: 2,000 distinct" in result.stdout
    assert not (tmp_path / "out").exists()      # measuring the data writes nothing
