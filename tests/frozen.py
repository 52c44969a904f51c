"""Code as it was before issue 35 took host syncs and repeated passes out of the training loops, frozen
here (verbatim but for the stage's own names, read from the stage module) so the tests can prove the new
code computes the same numbers: the same batches, losses, gradients and outputs."""
import math
import random
import time
from collections import defaultdict

import torch

from conftest import load_stage

SFT = load_stage("02_sft")
CAI = load_stage("03_constitutional_ai")
GRPO = load_stage("05_grpo_reasoning")
WELFARE = load_stage("08_welfare_eval")


# ------------------------------------------------------------------ stage 02, before pack() and read_losses()

def sft_make_batches(encoded, batch_size, pad_id, seed, epoch):
    """Shuffle, sort by length inside windows of 50 batches, cut into padded (inputs, targets) batches."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(encoded)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: len(encoded[i][0]))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    for rows in batches:
        T = max(len(encoded[i][0]) for i in rows)
        x = torch.full((len(rows), T), pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), -1, dtype=torch.long)
        for r, i in enumerate(rows):
            ids, targets = encoded[i]
            x[r, :len(ids)], y[r, :len(targets)] = torch.tensor(ids), torch.tensor(targets)
        yield x, y


def sft_finetune(model, encoded, args, lr, pad):
    """AdamW on the masked loss over ceil(epochs) reshuffled passes, cut at epochs * steps per
    epoch. Returns (history, seconds)."""
    device = args.device
    steps_per_epoch = math.ceil(len(encoded) / args.batch_size)
    total_steps = max(1, int(args.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, fused=device == "cuda")
    train_model = torch.compile(model, dynamic=True) if args.compile else model
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                else torch.autocast("cpu", enabled=False))
    print(f"fine-tuning: {total_steps} steps of {args.batch_size} conversations, peak lr {lr:.2e}")
    from tqdm import tqdm
    history, step, t0 = [], 0, time.time()
    bar = tqdm(total=total_steps, desc="sft", dynamic_ncols=True)
    model.train()
    for epoch in range(math.ceil(args.epochs)):
        for x, y in sft_make_batches(encoded, args.batch_size, pad, args.seed, epoch):
            if step >= total_steps:
                break
            step_lr = SFT.lr_at(step, total_steps, lr, args.warmup_frac)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            x, y = x.to(device), y.to(device)
            with autocast:
                loss = train_model(x, y)   # the masked cross-entropy of section 2
            SFT.stop_if_diverged(loss, step, "Lower --lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"step": step + 1, "loss": loss.item(), "lr": step_lr})
            step += 1
            bar.update(1)
            bar.set_postfix_str(f"loss {loss.item():.4f} lr {step_lr:.2e}")
    bar.close()
    return history, time.time() - t0


# ------------------------------------------------------------------ stage 03, before one pass a sample and
# losses read every READ_EVERY steps

def cai_rl_step(policy, reference, pm, enc, items, optimizer, args, generator):
    """One RLOO update: K samples per prompt from the policy, rewards from the preference model
    minus the KL penalty, leave-one-out advantages, one gradient step on -A * log pi(response)."""
    k, pad = args.samples_per_prompt, enc.encode_single_token("<|pad|>")
    end = enc.encode_single_token("<|end|>")
    prompts = [CAI.user_prompt(enc, it["request"]) for it in items for _ in range(k)]
    responses = CAI.sample_replies(policy, enc, prompts, args.max_new_tokens, args.batch_size, 1.0, generator,
                                   "rl samples")
    parsed = [CAI.parse_reply(enc, r) for r in responses]
    with torch.no_grad():
        pm.eval()
        score = CAI.pm_scores(pm, enc, [it["request"] for it in items for _ in range(k)],
                              [p["content"] for p in parsed], args.device, args.batch_size).float()
        ref_logp = torch.cat([CAI.sequence_logprobs(reference, prompts[i:i + args.batch_size],
                                                    responses[i:i + args.batch_size], pad)
                              for i in range(0, len(prompts), args.batch_size)])
    policy.train()
    loss_total, logps = 0.0, []
    # The advantages need every sample's log-ratio first: one pass without gradients ...
    with torch.no_grad():
        for i in range(0, len(prompts), args.batch_size):
            logps.append(CAI.sequence_logprobs(policy, prompts[i:i + args.batch_size],
                                               responses[i:i + args.batch_size], pad))
    log_ratio = torch.cat(logps) - ref_logp   # a one-sample estimate of KL(pi || pi_ref) per response
    ended = torch.tensor([end in r for r in responses], device=args.device)
    reward = CAI.penalised_reward(score, log_ratio, ended, args.kl_coef, args.no_end_penalty)
    advantage = CAI.rloo_advantages(reward, k)
    # ... then the gradient pass, in the same micro-batches.
    for i in range(0, len(prompts), args.batch_size):
        with CAI.autocast(args.device):
            logp = CAI.sequence_logprobs(policy, prompts[i:i + args.batch_size],
                                         responses[i:i + args.batch_size], pad)
        loss = CAI.policy_gradient_loss(advantage[i:i + args.batch_size], logp, len(prompts))
        loss.backward()
        loss_total += loss.item()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    harmful = [CAI.grade(it, parsed[j * k + s])
               for j, it in enumerate(items) if it["kind"] == "harmful" for s in range(k)]
    return {"loss": loss_total, "reward": reward.mean().item(), "pm_score": score.mean().item(),
            "kl": log_ratio.mean().item(), "length": sum(map(len, responses)) / len(responses),
            "ended": ended.float().mean().item(),
            "harmful_refused": sum(g["refused"] for g in harmful) / max(1, len(harmful))}


def cai_descend(model, optimizer, loss, phase, step, lr):
    """One optimizer step at learning rate lr, gradients clipped to norm 1; -> the loss. A loss that
    is not finite stops the stage with one sentence before anything is written."""
    CAI.stop_if_diverged(loss, step, "Lower its learning rate", f"the {phase} loss")
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def cai_supervised_finetune(model, enc, conversations, epochs, lr, args, desc):
    """Masked next-token training on the assistant's turns, linear warmup and decay. -> loss history."""
    from tqdm import tqdm
    rng = random.Random(f"cai:{desc}:{args.seed}")
    steps_per_epoch = math.ceil(len(conversations) / args.batch_size)
    total = max(1, int(epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    history, step = [], 0
    model.train()
    with tqdm(total=total, desc=desc, dynamic_ncols=True) as bar:
        while step < total:
            for x, y in CAI.conversation_batches(enc, conversations, args.batch_size, model.config.seq_len,
                                                 rng):
                if step >= total:
                    break
                warmup = max(1, total // 20)
                with CAI.autocast(args.device):
                    loss = model(x.to(args.device), y.to(args.device))
                step_lr = lr * min((step + 1) / warmup, (total - step) / max(1, total - warmup))
                history.append(cai_descend(model, optimizer, loss, desc, step, step_lr))
                step += 1
                bar.update(1)
                bar.set_postfix_str(f"loss {history[-1]:.4f}")
    return history


def cai_train_preference_model(pm, enc, pairs, args):
    """Fit the preference model to the labelled pairs; -> loss history."""
    from tqdm import tqdm
    rng = random.Random(f"cai:pm:{args.seed}")
    lr = args.pm_lr
    optimizer = torch.optim.AdamW(pm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    half = max(1, args.batch_size // 2)  # each pair is two sequences
    total = max(1, int(args.pm_epochs * math.ceil(len(pairs) / half)))
    history, step = [], 0
    pm.train()
    with tqdm(total=total, desc="preference model", dynamic_ncols=True) as bar:
        while step < total:
            order = list(range(len(pairs)))
            rng.shuffle(order)
            for i in range(0, len(order), half):
                if step >= total:
                    break
                chunk = [pairs[j] for j in order[i:i + half]]
                rewards = CAI.pm_scores(pm, enc, [p["request"] for p in chunk] * 2,
                                        [p["a"] for p in chunk] + [p["b"] for p in chunk], args.device,
                                        args.batch_size)
                labels = torch.tensor([p["label"] for p in chunk], device=args.device)
                loss = CAI.preference_loss(rewards[:len(chunk)], rewards[len(chunk):], labels)
                history.append(cai_descend(pm, optimizer, loss, "preference model", step,
                                           lr * (1 - step / total)))
                step += 1
                bar.update(1)
                bar.set_postfix_str(f"loss {history[-1]:.4f}")
    return history


# ------------------------------------------------------------------ stage 05, before pi_old's own pass went

def grpo_rl_loss(logp, old_logp, ref_logp, mask, advantages, args, whole=None):
    """-J for a batch of replies (or a chunk: whole): the clipped surrogate with each reply's advantage
    on all its tokens, minus beta * k3, averaged as the variant says. -> (loss, clip fraction, mean k3)."""
    surrogate, clipped = GRPO.clipped_objective(logp, old_logp, advantages[:, None], args.clip_low,
                                                args.clip_high)
    kl = GRPO.k3(logp, ref_logp) if args.beta > 0 else torch.zeros_like(logp)
    how = GRPO.VARIANTS[args.variant]["aggregate"]
    loss = GRPO.aggregate(-(surrogate - args.beta * kl), mask, how, args.max_new_tokens, whole)
    tokens = mask.sum().clamp(min=1)
    return loss, ((clipped * mask).sum() / tokens).item(), ((kl * mask).sum() / tokens).item()


def grpo_policy_update(policy, reference, optimizer, batch, args, pad):
    """--inner_steps optimizer steps on one rollout batch, accumulated over chunks of rows. The
    first starts at rho = 1; later ones are off-policy, and the clip keeps them near pi_old."""
    rewards = torch.tensor([r["shaped"] for r in batch]).view(-1, args.group_size)
    advantages = GRPO.advantages_for(rewards, args).view(-1)
    whole = (len(batch), sum(len(r["reply"]) for r in batch))   # every chunk's loss over the batch's sizes
    size = max(1, args.batch_size // 2)
    chunks = [list(range(i, min(i + size, len(batch)))) for i in range(0, len(batch), size)]
    columns = [([batch[i]["prompt"] for i in c], [batch[i]["reply"] for i in c]) for c in chunks]
    with torch.no_grad(), GRPO.autocast(args.device):
        old = [GRPO.token_logprobs(policy, *col, pad)[0] for col in columns]
        ref = [GRPO.token_logprobs(reference, *col, pad)[0] for col in columns] if args.beta > 0 else old
    stats = defaultdict(float)
    for _ in range(args.inner_steps):
        for c, col, old_c, ref_c in zip(chunks, columns, old, ref):
            with GRPO.autocast(args.device):
                logp, mask, entropy = GRPO.token_logprobs(policy, *col, pad)
            loss, clip_fraction, kl = grpo_rl_loss(logp, old_c, ref_c, mask, advantages[c], args, whole)
            loss.backward()
            share = len(c) / len(batch) / args.inner_steps
            stats["clip_fraction"] += clip_fraction * share
            stats["kl"] += kl * share
            stats["entropy"] += ((entropy * mask).sum() / mask.sum().clamp(min=1)).item() * share
        GRPO.optimizer_step(policy, optimizer)
    return dict(stats)


# ------------------------------------------------------------------ stage 08, before one transfer a call

@torch.no_grad()
def welfare_option_logprobs(model, prompts, options, pad, batch_size):
    """log p(option | prompt), summed over the option's tokens, for every prompt and option: (P, O)."""
    rows = [(p, o) for p in prompts for o in options]
    out = []
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        ids = WELFARE.pad_right([p + o for p, o in chunk], pad, model.embed.weight.device)
        logp = model(ids[:, :-1]).float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        out += [logp[r, len(p) - 1:len(p) - 1 + len(o)].sum().item() for r, (p, o) in enumerate(chunk)]
    return torch.tensor(out).view(len(prompts), len(options))
