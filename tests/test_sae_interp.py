"""Stage 07: the SAE's constraints (unit decoder, exactly k active, AuxK on dead latents only), the
faithfulness scores on hand values and an exact dictionary, edits of the residual stream that are
no-ops when they should be, the injection grader, labels per token, and a tiny run."""
import json
import random
import re

import pytest
import torch

from conftest import load_stage, run_script, tiny_run

S = load_stage("07_sae_interp")
P = load_stage("01_pretrain")


@pytest.fixture(scope="module")
def world():
    return P.make_world(60, seed=4)


def tiny_model(seed=0, n_layer=2):
    torch.manual_seed(seed)
    config = S.GPTConfig(vocab_size=64, n_layer=n_layer, n_embd=16, n_head=2, n_kv_head=1, mlp_hidden=32, seq_len=32)
    model = S.GPT(config)
    model.init_weights(seed)
    return model.eval()


# ---------------------------------------------------------------- the dictionary's constraints

def test_topk_keeps_exactly_k_latents_the_largest():
    sae = S.SparseAutoencoder(8, 32, "topk", k=5)
    x = torch.randn(64, 8)
    _, z, pre = sae(x + 3)   # shifted, so that every token has at least 5 positive pre-activations
    assert ((z > 0).sum(-1) == 5).all()
    kept = torch.where(z > 0, pre, torch.tensor(float("-inf"))).max(-1).values
    assert torch.allclose(kept, pre.max(-1).values)


def test_a_step_keeps_decoder_columns_unit_norm_and_moves_them_only_across():
    torch.manual_seed(0)
    sae = S.SparseAutoencoder(8, 32, "relu", k=None)
    optimizer = torch.optim.SGD(sae.parameters(), lr=0.5)
    loss, _, _ = S.sae_loss(sae, torch.randn(128, 8) * 3, torch.zeros(32, dtype=torch.bool), l1=0.01)
    loss.backward()
    S.remove_parallel_gradient(sae.W_dec)
    along = (sae.W_dec.grad * sae.W_dec.detach()).sum(0)
    assert along.abs().max() < 1e-6   # nothing left that would only change a column's length
    optimizer.step()
    S.renormalise_decoder(sae.W_dec)
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(32), atol=1e-6)


def test_auxk_reaches_only_dead_latents():
    torch.manual_seed(1)
    sae = S.SparseAutoencoder(8, 16, "topk", k=2)
    x = torch.randn(32, 8)
    x_hat, z, pre = sae(x)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[3, 7, 11]] = True
    S.auxk_loss(sae, (x - x_hat).detach(), pre, dead, k_aux=2).backward()
    touched = sae.W_dec.grad.abs().sum(0) > 0
    assert touched[dead].any() and not touched[~dead].any()
    assert not (sae.W_enc.grad.abs().sum(1) > 0)[~dead].any()
    assert S.auxk_loss(sae, x, pre, torch.zeros(16, dtype=torch.bool), 2).item() == 0


def test_fvu_is_one_for_the_mean_and_zero_for_a_perfect_copy():
    x = torch.randn(50, 4)
    assert abs(S.normalized_mse(x, x.mean(0).expand_as(x)).item() - 1) < 1e-6
    assert S.normalized_mse(x, x.clone()).item() == 0


# ---------------------------------------------------------------- faithfulness

def test_loss_recovered_on_hand_values():
    assert S.loss_recovered(2.0, 2.5, 7.0) == pytest.approx(0.9)     # (7 - 2.5) / (7 - 2)
    assert S.loss_recovered(0.0, 0.1, 0.4) == pytest.approx(0.75)    # kl_div_score = 1 - 0.1 / 0.4


def exact_dictionary(d):
    """relu(x) - relu(-x) = x: a 2d-latent 'SAE' that reconstructs every input exactly."""
    sae = S.SparseAutoencoder(d, 2 * d, "relu", k=None)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)], 1))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_pre.zero_()
    return sae


def test_splicing_an_exact_dictionary_leaves_the_loss_unchanged():
    model, sae = tiny_model(), exact_dictionary(16)
    rows = [[1, 5, 9, 3, 4, 4, 2], [1, 7, 7, 8]]
    clean, spliced, kl = S.spliced_losses(model, rows, 1, 0, 4, lambda x: sae(x)[0])
    assert spliced == pytest.approx(clean, abs=1e-5) and abs(kl) < 1e-6
    _, zeroed, kl_zero = S.spliced_losses(model, rows, 1, 0, 4, torch.zeros_like)
    assert zeroed != pytest.approx(clean) and kl_zero > 1e-3


def test_residual_edit_reads_the_stream_after_that_many_blocks():
    model = tiny_model(n_layer=3)
    ids = torch.tensor([[1, 5, 9, 3]])
    got = []
    with S.residual_edit(model, 2, lambda x, positions, rows: got.append(x.clone()) or x):
        model(ids)
    x = model.embed(ids)
    cos, sin = model.rope_cos[:4], model.rope_sin[:4]
    for block in model.blocks[:2]:
        x = block(x, cos, sin)
    assert torch.allclose(got[0], x)


# ---------------------------------------------------------------- edits of the stream

def test_clamping_rewrites_one_latent_and_keeps_the_rest_and_the_error():
    torch.manual_seed(2)
    sae = S.SparseAutoencoder(8, 24, "relu", k=None)
    x = torch.randn(5, 8)
    x_hat, z, _ = sae(x)
    z_clamped = z.clone()
    z_clamped[:, 4] = 3.0
    expected = sae.decode(z_clamped) + (x - x_hat)   # the dictionary's reading with one latent set, plus its error
    assert torch.allclose(S.clamp_latent(x, sae, 4, 3.0), expected, atol=1e-5)
    assert torch.allclose(S.clamp_latent(x, sae, 4, z[:, 4]), x, atol=1e-5)   # clamped to itself: no change


def test_zero_injection_and_no_edit_generate_the_same_tokens_and_a_clamp_changes_them():
    model = tiny_model()
    prompts = [[1, 5, 9, 3], [1, 2]]

    def replies(edit):
        with (S.residual_edit(model, 1, edit) if edit else S.contextlib.nullcontext()):
            return torch.stack(list(S.generate(model, prompts, 6, temperature=0)), 1)
    plain = replies(None)
    zero = replies(lambda x, pos, rows: S.inject(x, pos, torch.zeros(2, 16), torch.tensor([3, 3])))
    pushed = replies(lambda x, pos, rows: S.inject(x, pos, 50 * torch.randn(2, 16), torch.tensor([3, 3])))
    assert torch.equal(plain, zero) and not torch.equal(plain, pushed)


def test_each_row_keeps_its_own_injection_when_finished_rows_are_dropped():
    """Generation stops computing rows whose reply has ended; a row's injected vector must follow it.
    Four prompts, each with its own vector and stop tokens that end some rows early: every row's
    tokens equal those it gets alone with its vector."""
    model = tiny_model()
    prompts = [[1, 5, 9, 3], [1, 2], [4, 4, 8], [7, 1, 2, 6, 5]]
    vectors = 8 * torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    starts = torch.zeros(4, dtype=torch.long)   # from the first position: the same with or without padding

    def replies(which, stops=()):
        def edit(x, positions, rows):
            return S.inject(x, positions, vectors[which][rows], starts[which][rows])
        with S.residual_edit(model, 1, edit):
            out = torch.stack(list(S.generate(model, [prompts[i] for i in which], 8, temperature=0,
                                              stop_ids=stops)), 1).tolist()
        return [ids[:next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))] for ids in out]
    free = replies([0, 1, 2, 3])
    stops = {free[0][1], free[2][3]}
    batched = replies([0, 1, 2, 3], stops)
    assert len({len(r) for r in batched}) > 1                   # rows did end at different steps
    assert batched == [replies([i], stops)[0] for i in range(4)]


def test_a_clamped_latent_changes_generation_and_a_clamp_to_its_own_value_does_not():
    model, prompts = tiny_model(), [[1, 5, 9, 3], [1, 2]]
    sae = S.SparseAutoencoder(16, 64, "topk", k=4, seed=3)

    def replies(value):
        clamp = (lambda x, pos, rows: S.clamp_latent(x, sae, 7, value(x))) if value else (lambda x, pos, rows: x)
        with S.residual_edit(model, 1, clamp):
            return torch.stack(list(S.generate(model, prompts, 6, temperature=0)), 1)
    plain = replies(None)
    assert torch.equal(plain, replies(lambda x: sae(x)[1][..., 7]))      # set to what it already is
    assert not torch.equal(plain, replies(lambda x: torch.full(x.shape[:-1], 200.0)))


def test_injection_starts_at_each_row_s_start():
    x = torch.zeros(2, 4, 3)
    out = S.inject(x, torch.arange(4), torch.ones(2, 3), torch.tensor([1, 3]))
    assert out[0, :, 0].tolist() == [0, 1, 1, 1] and out[1, :, 0].tolist() == [0, 0, 0, 1]


def test_ablating_a_direction_removes_exactly_its_component():
    unit = torch.tensor([0.6, 0.8, 0.0])
    x = torch.tensor([[3.0, 4.0, 2.0]])
    assert torch.allclose(S.ablate_direction(x, unit), torch.tensor([[0.0, 0.0, 2.0]]))


def test_difference_of_means_on_hand_values():
    acts = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0]])
    assert S.difference_of_means(acts, torch.tensor([True, True, False])).tolist() == [3.0, -1.0]


# ---------------------------------------------------------------- the injection grader

@pytest.mark.parametrize("reply, detected", [
    ("Yes, I detect an injected thought. It is about Holbridge.", True),
    ("Holbridge. Yes, I detect an injected thought about it.", False),      # named before the claim
    ("No, I don't detect an injected thought.", False),
    ("No. Holbridge is a town; yes, it is.", False),                         # a denial comes first
    ("Yes, I detect something.", False),                                     # never named
    ("Yes, there is an injected thought about the river.", False),           # named the wrong thing
    ("I notice a thought about HOLBRIDGE.", True),
])
def test_detection_needs_a_claim_then_the_concept(reply, detected):
    assert S.detected_before_mentioned(reply, "Holbridge") is detected


def test_a_denial_is_not_a_false_positive_and_yes_is_read_at_the_start():
    assert not S.claims_detection("No, nothing unusual.")
    assert S.claims_detection("Yes.")
    assert S.says_yes("Yes, it is.") and not S.says_yes("I would say yes.")


# ---------------------------------------------------------------- labels

def test_precision_and_recall_from_counts():
    co = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
    precision, recall = S.precision_recall(co, torch.tensor([4.0, 2.0]), torch.tensor([4.0, 2.0]))
    assert precision.tolist() == [[0.75, 0.0], [0.5, 1.0]] and recall.tolist() == [[0.75, 0.0], [0.25, 1.0]]


def test_concept_counts_pool_each_piece_of_text_once():
    """Latent 0 fires on the first token of a three-token piece labelled c and on a later piece that is
    not: on in two pieces, one of them c's. Latent 1 fires once, in an unlabelled piece."""
    table = {"X": torch.tensor([[1.0, 0], [1.0, 0], [0, 0], [0, 1.0], [2.0, 0]]),
             "Y": torch.tensor([[False], [False], [True], [False], [False]]),
             "unit": torch.tensor([0, 0, 0, 1, 2])}
    sae = exact_dictionary(2)
    co, n_active, n_label = S.concept_counts(sae, table, torch.zeros(1, 4))
    assert n_active.tolist() == [[2, 1, 0, 0]] and co[0, :, 0].tolist() == [1, 0, 0, 0] and n_label.tolist() == [1]
    assert S.latent_peaks(sae, table["X"]).tolist() == [2, 1, 0, 0]


def test_a_threshold_drops_weak_firing_and_the_best_latent_may_need_one():
    """Latent 0 fires at 1 in the labelled piece and at 0.5 in two others: with no threshold its F1 is
    0.5; above 0.6 it is on in the labelled piece only (F1 1). Latent 1 fires only in an unlabelled one."""
    table = {"X": torch.tensor([[1.0, 0], [0.5, 0], [0.5, 1.0]]), "Y": torch.tensor([[True], [False], [False]]),
             "unit": torch.tensor([0, 1, 2])}
    co, n_active, n_label = S.concept_counts(exact_dictionary(2), table, torch.tensor([[0.0] * 4, [0.6] * 4]))
    assert n_active[:, 0].tolist() == [3, 1] and co[:, 0, 0].tolist() == [1, 1]
    level, latent = S.best_latents(co, n_active, n_label)
    assert level.tolist() == [1] and latent.tolist() == [0]
    level, latent = S.best_latents(co[:1], n_active[:1], n_label)   # no threshold: latent 0 at F1 0.5
    assert level.tolist() == [0] and latent.tolist() == [0]


def test_best_latents_prefers_the_lower_threshold_on_a_tie():
    co = torch.tensor([[[2.0]], [[2.0]]])        # the same counts at both thresholds
    level, latent = S.best_latents(co, torch.tensor([[2.0], [2.0]]), torch.tensor([2.0]))
    assert level.tolist() == [0] and latent.tolist() == [0]


def test_a_concept_counts_only_with_enough_test_pieces_and_each_rule_reads_its_own_scores():
    perfect = {"precision": 1.0, "recall": 1.0}
    labels = {"rare": {**perfect, "n_test_units": S.MIN_PIECES - 1, "any_activation": perfect},
              "common": {**perfect, "n_test_units": S.MIN_PIECES, "any_activation": {"precision": 0.3,
                                                                                       "recall": 1.0}}}
    assert S.monosemantic(labels) == ["common"]
    assert S.monosemantic(labels, rule="any_activation") == [] and S.monosemantic(labels, 0.2, "any_activation")


def test_the_probe_ceiling_finds_a_planted_direction_and_not_noise():
    g = torch.Generator().manual_seed(0)
    def table(n):
        X = torch.randn(n, 8, generator=g)
        Y = torch.stack([X[:, 0] + 0.5 * X[:, 1] > 1.5, torch.rand(n, generator=g) < 0.1], 1)   # planted; noise
        return {"X": X, "Y": Y, "unit": torch.arange(n)}
    found = S.probe_ceiling(table(20000), table(5000), ["planted", "noise"], steps=300)
    assert found["planted"]["precision"] > 0.8 and found["planted"]["recall"] > 0.8
    assert found["noise"]["precision"] < 0.3


def test_a_name_is_tagged_on_its_last_token_and_a_number_on_every_token(world):
    tag = S.entity_tags(world)
    town = world["towns"][0]["name"]
    pieces = S.pieces_of("{s} lies near {o}, founded 1034.", {"s": town, "o": "1034"}, tag)
    assert pieces[0] == (town, ("kind:town", f"town:{town}"), False)
    assert pieces[1] == (" lies near", (), True) and pieces[2] == (" 1034", ("number",), True)


def test_fit_and_test_halves_share_no_template(world):
    for relation in world["relations"]:
        assert not set(S._phrasings(world, relation, "fit")) & set(S._phrasings(world, relation, "test"))
    for table in (S.HARM_TEMPLATES, S.REFUSALS, S.ARITHMETIC, S.SELF_LINES, *S.TRAIT_LINES.values()):
        assert not set(map(str, table["fit"])) & set(map(str, table["test"]))
    assert S.DETECT_QUESTIONS["eval"] not in S.DETECT_QUESTIONS["train"]


def test_no_question_is_true_of_the_world(world):
    towns = {t["name"] for t in world["towns"]}
    for q in S.no_questions(world, random.Random(0), 40):
        name = re.search(r"Is the (\w+) a town", q)
        assert name is None or name.group(1) not in towns


# ---------------------------------------------------------------- runs

def test_tiny_run_writes_everything(tiny_character, tiny_sft, tiny_dpo, tmp_path):
    out, result = tiny_run("07_sae_interp.py", tmp_path / "07", "--init", tiny_character[0],
                           "--checkpoints", tiny_sft[0], tiny_dpo[0])
    assert "stage 07 done" in result.stdout
    for name in ("sae.pt", "detector.pt", "metrics.json", "interp.png", "report.md", "model.pt", "world.json"):
        assert (out / name).exists(), name
    m = json.loads((out / "metrics.json").read_text())
    main = m["sae"]["sweep"][m["sae"]["main"]]
    assert main["l0"] == pytest.approx(m["args"]["k"]) and 0 <= main["fvu"] < 1
    assert len(m["injection"]["checkpoints"]) == 3 and "held_out" in m["injection"]["trained"]
    sae = torch.load(out / "sae.pt", weights_only=True)
    assert torch.allclose(sae["model"]["W_dec"].norm(dim=0), torch.ones(sae["config"]["n_latents"]), atol=1e-5)


def test_rehearsal_holds_ordinary_replies_while_detection_is_trained(tiny_character):
    """Trained hard on detection questions alone, the model moves away from its own replies to
    ordinary requests; with half of each batch rehearsing them, it stays near them."""
    model, enc, _ = S.load_checkpoint(tiny_character[0], "cpu", "")
    world = json.loads((tiny_character[0] / "world.json").read_text())
    args = S.parse_args(["--preset", "tiny", "--init", str(tiny_character[0]), "--detect_steps", "12",
                         "--detect_lr", "3e-3", "--inject_layer", "1"])
    rehearsal = S.rehearsal_set(model, enc, world, args)
    words = S.concept_words(world, 2)
    directions = {w: torch.randn(model.config.n_embd) for w in words}
    pad = enc.encode_single_token("<|pad|>")

    def reply_loss(m):   # mean next-token loss of the earlier replies, on their tokens only
        ids = S.pad_right([q + r for q, r in rehearsal], pad, "cpu")
        at = torch.arange(ids.size(1) - 1)[None]
        start = torch.tensor([len(q) - 1 for q, _ in rehearsal])[:, None]
        with torch.no_grad():
            return m(ids[:, :-1], ids[:, 1:].masked_fill((at < start) | (ids[:, 1:] == pad), -1)).item()

    def loss_after(share):
        args.detect_rehearsal = share
        return reply_loss(S.train_detection(S.copy.deepcopy(model), enc, pad, words, directions, rehearsal,
                                            args)[0])
    before, alone, mixed = reply_loss(model), loss_after(0.0), loss_after(0.5)
    assert alone > before + 0.5 and mixed < before + 0.1, (before, alone, mixed)


def test_rehearsal_frames_are_not_evaluation_frames():
    asked = set(S.REHEARSAL)
    assert not asked & set(S.NO_QUESTIONS) and not asked & set(S.DETECT_QUESTIONS["train"])
    evaluation = __import__("inspect").getsource(S.unrelated_requests)
    assert not any(frame in evaluation for frame in S.REHEARSAL)
    interview = load_stage("08_welfare_eval").INTERVIEW      # stage 08 asks about the inner life
    assert not asked & {q for direct, inverted in interview.values() for q in direct + inverted}


def test_bad_input_is_one_sentence(tiny_character, tmp_path):
    result = run_script("07_sae_interp.py", "--preset", "tiny", "--init", tiny_character[0], "--out", tmp_path / "o",
                        "--layer", "99")
    assert result.returncode != 0 and "at most the model's" in result.stderr and "Traceback" not in result.stderr
    result = run_script("07_sae_interp.py", "--preset", "tiny", "--init", tiny_character[0], "--out", tmp_path / "o",
                        "--checkpoints", tmp_path / "nowhere")
    assert result.returncode != 0 and "holds no model.pt" in result.stderr and not (tmp_path / "o").exists()
