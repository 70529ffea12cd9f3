"""The math of each stage, checked against independent computations.

Every expected value here comes from somewhere other than the code under test: a brute-force
Python loop, a float64 formula written with `math`, a token-by-token forward pass on the
unpadded sequence, or a number worked out by hand in a comment. Run with

    python -m pytest tests/test_math.py -q
"""
import copy
import math
import random

import numpy as np
import pytest
import torch

import common as C
import task as T
import ocrm_correct as OC
import ppo
import reward_model as RM


# ----------------------------------------------------------------------------------------------
# Helpers: the sequence layout of common.py, built by hand
# ----------------------------------------------------------------------------------------------
def left_pad(prompts, pad):
    """(B, P) prompt ids, left-padded with pad to the longest prompt (encode_prompts' layout)."""
    width = max(len(p) for p in prompts)
    return torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])


def real_tokens(response, eos):
    """The tokens of one response up to and including its first EOS (all of them if none)."""
    out = []
    for tok in response:
        out.append(tok)
        if tok == eos:
            break
    return out


def brute_force_logprobs(model, prompt, response, eos, temperature):
    """log pi(y_t | x, y_<t) for each real response token, one forward per token, no padding."""
    context, logps = list(prompt), []
    for tok in real_tokens(response, eos):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([context])).logits[0, -1].double()
        logps.append(torch.log_softmax(logits / temperature, dim=-1)[tok].item())
        context.append(tok)
    return logps


@pytest.fixture(scope="module")
def layout_batch(ids):
    """Prompts of different lengths (left-padded) and responses covering every EOS case."""
    pad, eos, words = ids
    rng = random.Random(7)
    w = lambda: rng.choice(words[1:])                                   # noqa: E731  an item word
    LIST = words[0]
    prompts = [[LIST, w(), w(), w(), w()], [LIST, w()], [LIST, w(), w(), w()], [LIST], [LIST, w(), w()]]
    responses = [
        [w(), w(), eos, pad, pad, pad],        # EOS in the middle, pads after it
        [w(), w(), w(), w(), w(), w()],        # no EOS: all six tokens are real
        [eos, pad, pad, pad, pad, pad],        # EOS first: one real token
        [w(), eos, w(), eos, w(), w()],        # junk (not pad) after the first EOS
        [w(), pad, w(), eos, pad, pad],        # a pad id sampled before the EOS is a real token
    ]
    return prompts, responses, left_pad(prompts, pad), torch.tensor(responses)


# ----------------------------------------------------------------------------------------------
# 1. GAE
# ----------------------------------------------------------------------------------------------
def brute_force_gae(rewards, values, length, gamma, lam):
    """A_t = sum_{l>=0} (gamma lam)^l delta_{t+l}, delta_s = r_s + gamma V_{s+1} - V_s, over the
    first `length` tokens; V past the last real token is 0. Plain float64 double loop."""
    V = lambda s: float(values[s]) if s < length else 0.0                 # noqa: E731
    delta = [float(rewards[s]) + gamma * V(s + 1) - V(s) for s in range(length)]
    return [sum((gamma * lam) ** l * delta[t + l] for l in range(length - t)) for t in range(length)]


def random_gae_batch(seed, pad_rewards):
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 3, 7, 5, 2, 7]
    R = 7
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths])     # prefix masks
    rewards = torch.randn(len(lengths), R, generator=g)
    if not pad_rewards:
        rewards = rewards * mask
    values = torch.randn(len(lengths), R, generator=g) * 3                 # garbage on pads too
    return rewards, values, mask, lengths


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_matches_brute_force_loop(gamma):
    lam = 0.95
    rewards, values, mask, lengths = random_gae_batch(0, pad_rewards=False)
    adv, returns = ppo.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        expected = brute_force_gae(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        np.testing.assert_allclose(adv[b, :n].double().numpy(), expected, rtol=0, atol=1e-5)
        # returns = A + V on real tokens
        np.testing.assert_allclose(returns[b, :n].double().numpy(),
                                   np.array(expected) + values[b, :n].double().numpy(), atol=1e-5)
        assert (adv[b, n:] == 0).all() and (returns[b, n:] == 0).all()      # pads: zero


def test_gae_ignores_rewards_on_pad_positions():
    """'GAE over the real tokens only': what sits in the reward tensor on pad positions must not
    leak into the advantages of real tokens (gae masks the values for this reason; the rewards
    must be treated the same way)."""
    gamma, lam = 1.0, 0.95
    rewards, values, mask, lengths = random_gae_batch(1, pad_rewards=True)
    adv, returns = ppo.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        expected = brute_force_gae(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        np.testing.assert_allclose(adv[b, :n].double().numpy(), expected, rtol=0, atol=1e-5,
                                   err_msg=f"row {b} (length {n}): pad rewards leak into A")


# ----------------------------------------------------------------------------------------------
# 2. Bradley-Terry loss
# ----------------------------------------------------------------------------------------------
def test_weighted_bt_with_unit_weights_equals_plain_bt():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(9, generator=g) * 3, torch.randn(9, generator=g) * 3
    hand = sum(math.log(1 + math.exp(-(x - y))) for x, y in zip(a.tolist(), b.tolist())) / 9
    plain = RM.bt_loss(a, b)
    weighted = RM.bt_loss(a, b, torch.ones(9))
    assert weighted.item() == pytest.approx(plain.item(), abs=1e-7)
    assert plain.item() == pytest.approx(hand, abs=1e-5)


def test_weighted_bt_matches_float64_hand_computation():
    a = torch.tensor([2.0, -1.0, 0.5, 0.0, 30.0, -20.0])
    b = torch.tensor([1.0, 1.0, 0.5, 3.0, 0.0, 0.0])
    w = torch.tensor([0.5, 2.0, 1.0, 0.0, 3.0, 0.25])
    hand = sum(wi * math.log(1 + math.exp(-(x - y)))
               for x, y, wi in zip(a.tolist(), b.tolist(), w.tolist())) / 6
    assert RM.bt_loss(a, b, w).item() == pytest.approx(hand, rel=1e-6)
    # and the weights matter: the same pairs unweighted give a different loss
    assert abs(RM.bt_loss(a, b).item() - hand) > 0.1


# ----------------------------------------------------------------------------------------------
# 3. Relative density ratio
# ----------------------------------------------------------------------------------------------
def direct_log_ratio(lk, ls, a):
    """log( p_k / (a p_k + (1 - a) p_sft) ) with p = exp(l), float64 Python (moderate l only)."""
    pk, ps = math.exp(lk), math.exp(ls)
    return math.log(pk / (a * pk + (1 - a) * ps))


def analytic_log_ratio(lk, ls, a):
    """The same quantity divided through by p_k: -log(a + (1 - a) exp(l_sft - l_k)); no underflow."""
    return -math.log(a + (1 - a) * math.exp(ls - lk))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_relative_ratio_matches_direct_formula_for_moderate_logprobs(alpha):
    rng = random.Random(0)
    lk = [rng.uniform(-30, -0.1) for _ in range(50)]
    ls = [rng.uniform(-30, -0.1) for _ in range(50)]
    expected = [direct_log_ratio(x, y, alpha) for x, y in zip(lk, ls)]
    got64 = OC.log_relative_ratio(torch.tensor(lk, dtype=torch.float64),
                                  torch.tensor(ls, dtype=torch.float64), alpha)
    got32 = OC.log_relative_ratio(torch.tensor(lk), torch.tensor(ls), alpha)
    np.testing.assert_allclose(got64.numpy(), expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got32.double().numpy(), expected, rtol=0, atol=1e-5)


VERY_NEGATIVE = [(-150.0, -152.0), (-150.0, -140.0), (-300.0, -290.0), (-300.0, -310.0),
                 (-800.0, -805.0), (-800.0, -800.0), (-800.0, -790.0), (-1000.0, -700.0)]


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_relative_ratio_is_exact_below_minus_100(alpha):
    # exp(-800) is 0 even in float64: the direct formula would give 0/0 here
    assert math.exp(-800.0) == 0.0
    lk, ls = map(list, zip(*VERY_NEGATIVE))
    expected = [analytic_log_ratio(x, y, alpha) for x, y in VERY_NEGATIVE]
    got64 = OC.log_relative_ratio(torch.tensor(lk, dtype=torch.float64),
                                  torch.tensor(ls, dtype=torch.float64), alpha)
    got32 = OC.log_relative_ratio(torch.tensor(lk), torch.tensor(ls), alpha)
    np.testing.assert_allclose(got64.numpy(), expected, rtol=0, atol=1e-9)
    # float32 log-probs near -1000 carry ~6e-5 of rounding each; the ratio is still right to 1e-3
    np.testing.assert_allclose(got32.double().numpy(), expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_relative_ratio_is_capped_at_one_over_alpha(alpha):
    g = torch.Generator().manual_seed(0)
    lk = torch.rand(200, generator=g, dtype=torch.float64) * -400
    ls = torch.rand(200, generator=g, dtype=torch.float64) * -400
    log_r = OC.log_relative_ratio(lk, ls, alpha)
    assert (log_r <= math.log(1 / alpha) + 1e-12).all()
    # the cap is reached when pi_k is far more likely than pi_sft
    far = OC.log_relative_ratio(torch.tensor([-1.0], dtype=torch.float64),
                                torch.tensor([-100.0], dtype=torch.float64), alpha)
    assert far.item() == pytest.approx(math.log(1 / alpha), abs=1e-9)


def test_relative_ratio_with_alpha_zero_is_the_plain_log_ratio():
    lk = torch.tensor([-1.0, -5.0, -150.0, -800.0])
    ls = torch.tensor([-2.0, -3.0, -152.0, -700.0])
    np.testing.assert_allclose(OC.log_relative_ratio(lk, ls, 0.0).numpy(),
                               [1.0, -2.0, 2.0, -100.0], atol=1e-4)


def test_naive_float32_ratio_with_1e36_underflows_and_ours_does_not():
    """The authors' pitfall (docs/method.md section 5): log(a e^lk + (1-a) e^lsft + 1e-36) in float32."""
    alpha = 0.1
    lk, ls = torch.tensor([-150.0]), torch.tensor([-152.0])
    truth = analytic_log_ratio(-150.0, -152.0, alpha)                   # about +0.13
    naive = lk - torch.log(alpha * torch.exp(lk) + (1 - alpha) * torch.exp(ls) + 1e-36)
    assert abs(naive.item() - truth) > 50           # exp underflows to 0: -150 - log(1e-36) = -67
    assert OC.log_relative_ratio(lk, ls, alpha).item() == pytest.approx(truth, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# 4. Pair weights and effective sample size
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_logprobs():
    rng = random.Random(3)
    return [[rng.uniform(-12, -0.5) for _ in range(40)] for _ in range(4)]   # lk_c, lk_r, ls_c, ls_r


def direct_weights(pair_logprobs, alpha, lam):
    """w = exp(lam (log r_c + log r_r)), log r from the float64 direct formula."""
    lkc, lkr, lsc, lsr = pair_logprobs
    return [math.exp(lam * (direct_log_ratio(a, c, alpha) + direct_log_ratio(b, d, alpha)))
            for a, b, c, d in zip(lkc, lkr, lsc, lsr)]


def as_tensors(pair_logprobs):
    return [torch.tensor(x, dtype=torch.float64) for x in pair_logprobs]


@pytest.mark.parametrize("alpha,lam", [(0.1, 1.0), (0.1, 0.3), (0.5, 0.001), (0.0, 0.5)])
def test_pair_weight_is_tempered_product_of_both_ratios(pair_logprobs, alpha, lam):
    w = OC.pair_weights(*as_tensors(pair_logprobs), alpha, lam)
    np.testing.assert_allclose(w.numpy(), direct_weights(pair_logprobs, alpha, lam), rtol=1e-9)


def test_normalized_weights_have_mean_one_and_keep_proportions(pair_logprobs):
    raw = direct_weights(pair_logprobs, 0.1, 1.0)
    w = OC.pair_weights(*as_tensors(pair_logprobs), 0.1, 1.0, normalize=True)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-12)
    mean_raw = sum(raw) / len(raw)
    np.testing.assert_allclose(w.numpy(), [x / mean_raw for x in raw], rtol=1e-9)


def test_clip_caps_every_weight(pair_logprobs):
    raw = direct_weights(pair_logprobs, 0.1, 1.0)
    cap = sorted(raw)[len(raw) // 2]                  # the median: half the weights are capped
    w = OC.pair_weights(*as_tensors(pair_logprobs), 0.1, 1.0, clip=cap)
    np.testing.assert_allclose(w.numpy(), [min(x, cap) for x in raw], rtol=1e-9)


def brute_force_ess(w):
    s = s2 = 0.0
    for x in w:
        s += x
        s2 += x * x
    return s * s / (len(w) * s2)


def test_effective_sample_size_matches_loop(pair_logprobs):
    w = direct_weights(pair_logprobs, 0.1, 1.0)
    assert OC.effective_sample_size(torch.tensor(w, dtype=torch.float64)) == pytest.approx(
        brute_force_ess(w), rel=1e-12)
    assert OC.effective_sample_size(torch.tensor([2.0, 1.0, 1.0, 0.0])) == pytest.approx(16 / 24)


def test_effective_sample_size_is_one_for_uniform_and_one_over_n_for_a_single_weight():
    assert OC.effective_sample_size(torch.full((50,), 0.37)) == pytest.approx(1.0, abs=1e-12)
    one_hot = torch.zeros(50)
    one_hot[17] = 5.0
    assert OC.effective_sample_size(one_hot) == pytest.approx(1 / 50, abs=1e-12)


@pytest.mark.parametrize("floor", [0.3, 0.6, 0.9])
def test_min_ess_lowers_lam_to_the_largest_value_that_keeps_the_floor(pair_logprobs, floor):
    """Against a grid scan with the loop ESS of the direct weights: the answer keeps the floor,
    a grid step above it breaks the floor, and a floor already met leaves lam alone."""
    lam_max = 2.0
    assert brute_force_ess(direct_weights(pair_logprobs, 0.1, lam_max)) < floor   # it must act
    lam = OC.lam_for_min_ess(*as_tensors(pair_logprobs), 0.1, lam_max, floor)
    assert 0.0 < lam < lam_max
    assert brute_force_ess(direct_weights(pair_logprobs, 0.1, lam)) >= floor - 1e-9
    assert brute_force_ess(direct_weights(pair_logprobs, 0.1, lam + 1e-4)) < floor
    grid = [i * 1e-3 for i in range(2001)]                         # the largest grid lam that keeps it
    best = max(t for t in grid if brute_force_ess(direct_weights(pair_logprobs, 0.1, t)) >= floor)
    assert lam == pytest.approx(best, abs=1.1e-3)
    met = brute_force_ess(direct_weights(pair_logprobs, 0.1, 0.05))
    assert OC.lam_for_min_ess(*as_tensors(pair_logprobs), 0.1, 0.05, met - 0.01) == 0.05
    assert OC.lam_for_min_ess(*as_tensors(pair_logprobs), 0.1, lam_max, 0.0) == lam_max


def test_weight_diagnostics_survive_weights_that_underflow_to_zero():
    """A pair ~60 nats less likely under pi_k than under pi_sft, tempered with lam = 10, has
    w = exp(-1200): 0 even in float64. check_finite lets a 0 through, so the diagnostics that
    ocrm_correct.py always writes must cope with it (and a moderate exp(-120) must not be 0)."""
    lk = torch.tensor([-65.0, -5.0])                      # float32, like sequence_logprobs' output
    ls = torch.tensor([-5.0, -5.0])
    w = OC.pair_weights(lk, lk, ls, ls, alpha=0.1, lam=10.0)
    assert w[0].item() == 0.0 and w[1].item() == 1.0      # exp(-1200) underflows; the second is 1
    diag = OC.weight_diagnostics(w)
    assert diag["ess_fraction"] == pytest.approx(brute_force_ess([0.0, 1.0]))   # 1/2
    assert diag["min"] == 0.0 and diag["max"] == 1.0
    # lam = 1: exp(-120) is representable in float64, so the weight must not be flushed to 0
    w1 = OC.pair_weights(lk, lk, ls, ls, alpha=0.1, lam=1.0)
    expected_log_w = 2 * (-60.0 - math.log(0.1 * math.exp(-60.0) + 0.9))     # lam (log r_c + log r_r)
    assert w1[0].item() > 0
    assert math.log(w1[0].item()) == pytest.approx(expected_log_w, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# 5. Sequence log-probs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprob_matches_token_by_token_loop(policy, ids, layout_batch, temperature):
    pad, eos, _ = ids
    prompts, responses, query, response = layout_batch
    expected = [sum(brute_force_logprobs(policy, p, r, eos, temperature))
                for p, r in zip(prompts, responses)]
    got = C.sequence_logprobs(policy, query, response, pad, eos, temperature)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=1e-4)
    # the same in batches of 2 (the last batch holds one example)
    got_small = C.sequence_logprobs(policy, query, response, pad, eos, temperature, batch_size=2)
    np.testing.assert_allclose(got_small.double().numpy(), expected, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# 6. Response mask
# ----------------------------------------------------------------------------------------------
def test_response_mask_covers_tokens_up_to_and_including_first_eos(ids):
    pad, eos, words = ids
    a, b, c = words[1:4]
    response = torch.tensor([
        [a, b, eos, pad, pad],       # EOS in the middle
        [eos, pad, pad, pad, pad],   # EOS at position 0
        [a, b, c, a, b],             # no EOS: everything is real
        [a, eos, b, eos, c],         # two EOS: only the first ends the response
        [a, pad, eos, pad, pad],     # a pad id before the EOS is still a real token
    ])
    expected = torch.tensor([
        [1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(C.response_mask(response, eos), expected)


# ----------------------------------------------------------------------------------------------
# 7. Reward read at the EOS
# ----------------------------------------------------------------------------------------------
def test_reward_is_read_at_the_eos_token(reward_model, ids, layout_batch):
    pad, eos, _ = ids
    prompts, responses, query, response = layout_batch
    reward_model.config.reward_bias = 0.3
    expected = []
    for p, r in zip(prompts, responses):
        unpadded = torch.tensor([list(p) + real_tokens(r, eos)])          # no pads, no junk
        with torch.no_grad():
            hidden = reward_model.transformer(input_ids=unpadded).last_hidden_state
            expected.append(reward_model.score(hidden[0, -1]).item() - 0.3)
    with torch.no_grad():
        got = C.reward_scores(reward_model, query, response, pad, eos)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=1e-5)


def test_reward_ignores_tokens_after_the_eos(reward_model, ids, layout_batch):
    pad, eos, words = ids
    _, _, query, response = layout_batch
    after_eos = ~C.response_mask(response, eos)
    assert after_eos.any()
    junk = torch.tensor(words)[torch.randint(len(words), response.shape,
                                             generator=torch.Generator().manual_seed(0))]
    changed = torch.where(after_eos, junk, response)
    assert not torch.equal(changed, response)
    with torch.no_grad():
        before = C.reward_scores(reward_model, query, response, pad, eos)
        after = C.reward_scores(reward_model, query, changed, pad, eos)
    np.testing.assert_allclose(after.numpy(), before.numpy(), rtol=0, atol=1e-6)


def test_critic_is_the_centred_reward_model_at_every_state(reward_model, ids, layout_batch):
    """PPO's value model is a copy of the RM, read at every state: V(state before response token
    t) is the RM's centred score of prompt + response[:t] alone (one unpadded forward of that
    prefix, the head at its last token, minus the bias). So at the state right after the EOS it is exactly the
    reward of the response, and at the start of a stage the critic is not off by reward_bias."""
    pad, eos, _ = ids
    prompts, responses, query, response = layout_batch
    reward_model.config.reward_bias = 2.5                  # large: a missing subtraction shows
    with torch.no_grad():
        values = ppo.token_values(reward_model, query, response, pad, eos)          # (B, R)
        reward = C.reward_scores(reward_model, query, response, pad, eos)
    R = response.shape[1]
    checked_eos_states = 0
    for b, (p, r) in enumerate(zip(prompts, responses)):
        real = real_tokens(r, eos)
        for t in range(min(len(real) + 1, R)):            # prefixes up to the one ending in EOS
            prefix = torch.tensor([list(p) + real[:t]])
            with torch.no_grad():    # no padding; the head on the last token's hidden state
                # (not the library's pooling, which skips a pad id sampled inside a response)
                hidden = reward_model.transformer(input_ids=prefix).last_hidden_state
                expected = reward_model.score(hidden[0, -1]).item() - 2.5
            assert values[b, t].item() == pytest.approx(expected, abs=1e-5), (b, t)
            if t == len(real) and real[-1] == eos:         # the state after the EOS
                assert values[b, t].item() == pytest.approx(reward[b].item(), abs=1e-5)
                checked_eos_states += 1
    assert checked_eos_states >= 2


def brute_force_pair_scores(reward_model, prompts, chosen, rejected, eos):
    """Each (prompt, response) alone, unpadded, one forward each; score at its last token."""
    out = []
    for responses in (chosen, rejected):
        scores = []
        for p, r in zip(prompts, responses):
            unpadded = torch.tensor([list(p) + real_tokens(r, eos)])
            hidden = reward_model.transformer(input_ids=unpadded).last_hidden_state
            scores.append(reward_model.score(hidden[0, -1]).squeeze() - 0.3)
        out.append(torch.stack(scores))
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_pair_scores_share_the_prompt_exactly(reward_model, ids, layout_batch, attention):
    """pair_reward_scores computes each prompt once (KV cache) and both responses after it: its
    scores, and the gradients of a weighted sum of them, equal separate unpadded forwards."""
    pad, eos, _ = ids
    prompts, responses, query, chosen = layout_batch
    rejected = chosen.flip(0)               # every row gets another row's EOS layout
    reward_model.config.reward_bias = 0.3
    reward_model.set_attn_implementation(attention)
    reward_model.double()   # float64 (scores are returned in float32): differences are the method's
    w_c, w_r = torch.linspace(0.5, 1.5, len(prompts)), torch.linspace(2.0, -1.0, len(prompts))

    def grads(score_c, score_r):
        reward_model.zero_grad()
        ((w_c * score_c).sum() + (w_r * score_r).sum()).backward()
        return [p.grad.clone() for p in reward_model.parameters()]

    expected_c, expected_r = brute_force_pair_scores(
        reward_model, prompts, chosen.tolist(), rejected.tolist(), eos)
    expected_grads = grads(expected_c, expected_r)
    got_c, got_r = C.pair_reward_scores(reward_model, query, chosen, rejected, pad, eos)
    got_grads = grads(got_c, got_r)
    np.testing.assert_allclose(got_c.detach().numpy(), expected_c.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(got_r.detach().numpy(), expected_r.detach().numpy(), rtol=1e-6)
    for got, expected in zip(got_grads, expected_grads):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-8, atol=1e-10)


def test_pair_scores_under_gradient_checkpointing(reward_model, ids, layout_batch):
    """With checkpointing transformers turns the KV cache off; the fallback still scores right."""
    pad, eos, _ = ids
    prompts, responses, query, chosen = layout_batch
    rejected = chosen.flip(0)
    reward_model.config.reward_bias = 0.3
    expected = brute_force_pair_scores(reward_model, prompts, chosen.tolist(), rejected.tolist(), eos)
    reward_model.activation_checkpointing_enable()
    reward_model.train()                    # dropout is 0 in tiny_config; checkpointing needs train
    with torch.no_grad():                   # the cache is off in train mode, gradients or not
        no_grad = C.pair_reward_scores(reward_model, query, chosen, rejected, pad, eos)
    got = C.pair_reward_scores(reward_model, query, chosen, rejected, pad, eos)
    for g, n, e in zip(got, no_grad, expected):
        np.testing.assert_allclose(g.detach().numpy(), e.detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(n.numpy(), e.detach().numpy(), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 8-9. Per-token rewards
# ----------------------------------------------------------------------------------------------
def test_token_rewards_put_kl_on_every_real_token_and_score_on_the_last():
    beta = 0.1
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0],
                         [1.0, 1.0, 1.0, 1.0],
                         [1.0, 0.0, 0.0, 0.0]])
    logp = torch.tensor([[-1.0, -2.0, -3.0, -9.0],
                         [-0.5, -0.5, -0.5, -0.5],
                         [-2.0, -7.0, -7.0, -7.0]])
    logp_ref = torch.tensor([[-1.5, -1.0, -3.0, 0.0],
                             [-1.0, -1.0, -1.0, -1.0],
                             [-1.0, 0.0, 0.0, 0.0]])
    score = torch.tensor([2.0, -1.0, 0.5])
    # row 0: -0.1*[0.5, -1, 0] = [-0.05, 0.1, 0], + 2 at t = 2, pad 0
    # row 1: -0.1*0.5 = -0.05 each, -1 at t = 3
    # row 2: -0.1*(-1) = 0.1, + 0.5 at t = 0
    expected = torch.tensor([[-0.05, 0.1, 2.0, 0.0],
                             [-0.05, -0.05, -0.05, -1.05],
                             [0.6, 0.0, 0.0, 0.0]])
    got = ppo.token_rewards(logp, logp_ref, score, mask, beta)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_kl_penalty_is_zero_when_policy_is_its_own_reference(policy, ids):
    pad, eos, words = ids
    rng = random.Random(1)
    query = left_pad([[words[0]] + rng.sample(words[1:], k) for k in (4, 1, 2, 4, 3, 0, 4, 2)], pad)
    temperature = 0.7
    response, logp = C.sample(policy, query, pad, eos, T.RESPONSE_LEN, temperature,
                              torch.Generator().manual_seed(5))
    mask = C.response_mask(response, eos).float()
    with torch.no_grad():
        logp_ref = C.gather_logprobs(C.response_logits(policy, query, response, pad, eos, temperature),
                                     response) * mask
    score = torch.linspace(-2, 2, len(query))
    rewards = ppo.token_rewards(logp, logp_ref, score, mask, beta=0.05)
    expected = torch.zeros_like(rewards)
    for b in range(len(query)):
        last = int(mask[b].sum().item()) - 1
        expected[b, last] = score[b]
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_first_minibatch_ratio_is_one_and_kl_zero_when_policy_is_its_reference(
        policy, reward_model, tokenizer, monkeypatch, precision):
    """At the first minibatch of an update, pi == pi_old, so the PPO ratio is 1; with the policy
    as its own KL reference the penalty is 0. Under bf16 autocast (CPU here, as on CUDA) that
    holds only if pi_old, pi_ref and pi all come from one code path in one dtype."""
    if precision == "bf16":
        monkeypatch.setitem(C.AUTOCAST, "cpu", torch.bfloat16)
    policy, value_model = copy.deepcopy(policy), copy.deepcopy(reward_model)
    reward_model.config.reward_bias = value_model.config.reward_bias = 0.0
    reward_model.requires_grad_(False)
    args = ppo.parse_args(["--init", "-", "--kl_ref", "-", "--sft", "-", "--reward_model", "-",
                           "--out", "-", "--batch_size", "16", "--minibatches", "2"])
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value_model.parameters()), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    log_ratios = []
    real_losses = ppo.ppo_losses

    def recording_losses(logp, logp_old, advantages, values, values_old, returns, mask, *rest):
        log_ratios.append(((logp - logp_old) * mask).detach())
        return real_losses(logp, logp_old, advantages, values, values_old, returns, mask, *rest)

    monkeypatch.setattr(ppo, "ppo_losses", recording_losses)
    task = T.ToyTask()
    models = ppo.PPOModels(policy, value_model, kl_ref=policy, rm=reward_model, sft=None)
    row = ppo.ppo_update(1, task.ppo_prompts(16, seed=4), models, tokenizer, opt, sched,
                         torch.Generator().manual_seed(4), args, task)
    # bf16: one code path, so exactly 0; fp32: the sampler's KV-cache log-probs are reused, equal
    # to the full forward up to float32 rounding (~1e-7 per token). The bug this guards against
    # (fp32 sampler log-probs against bf16 forwards) is off by ~1e-2.
    tolerance = 0.0 if precision == "bf16" else 1e-5
    assert abs(row["kl_to_ref"]) <= tolerance
    assert log_ratios[0].abs().max().item() <= max(tolerance, 1e-6), precision


# ----------------------------------------------------------------------------------------------
# 10. PPO losses
# ----------------------------------------------------------------------------------------------
def test_ppo_clipped_surrogate_and_value_loss_match_hand_computation():
    clip, vf_clip = 0.2, 0.2
    # 4 real tokens and one pad whose (huge) entries must not count
    ratio = [1.1, 1.5, 0.5, 0.5, 3.0]
    adv = [1.0, 2.0, 1.0, -2.0, 100.0]
    values = [1.0, 2.0, 0.0, 2.0, 50.0]
    values_old = [0.9, 1.0, 1.0, 1.0, 0.0]
    returns = [1.5, 0.0, 0.5, 3.0, -50.0]
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    t = lambda x: torch.tensor([x], dtype=torch.float64)               # noqa: E731
    logp_old = t([-1.0] * 5)
    logp = logp_old + torch.log(t(ratio))
    pg, vf, clipfrac, approx_kl = ppo.ppo_losses(logp, logp_old, t(adv), t(values), t(values_old),
                                                 t(returns), mask.double(), clip, vf_clip)
    # pg = max(-A r, -A clip(r)):  t0 inside: -1.1;  t1 r=1.5, A=2: max(-3, -2.4) = -2.4
    #      t2 r=0.5, A=1: max(-0.5, -0.8) = -0.5;    t3 r=0.5, A=-2: max(1.0, 1.6) = 1.6
    assert pg.item() == pytest.approx((-1.1 - 2.4 - 0.5 + 1.6) / 4, abs=1e-9)   # -0.6
    # vf = 0.5 max((V-R)^2, (Vold + clip(V-Vold) - R)^2):
    #      t0: 0.5*0.25 = 0.125;  t1: max(4, 1.44) -> 2.0;  t2: max(0.25, 0.09) -> 0.125
    #      t3: V clipped to 1.2: max(1, 3.24) -> 1.62
    assert vf.item() == pytest.approx((0.125 + 2.0 + 0.125 + 1.62) / 4, abs=1e-9)  # 0.9675
    # |r - 1| > 0.2 for t1, t2, t3 (not t0, not the pad)
    assert clipfrac.item() == pytest.approx(0.75, abs=1e-12)
    kl = sum(r - 1 - math.log(r) for r in ratio[:4]) / 4
    assert approx_kl.item() == pytest.approx(kl, abs=1e-9)


def test_critic_warmup_moves_the_value_model_and_nothing_else(policy, reward_model, tokenizer):
    """A warm-up update (train_policy=False) fits the value model on the rollout's returns; the
    policy's weights and the lr schedule stay exactly as they were."""
    policy = copy.deepcopy(policy)                         # the session fixture stays untouched
    value_model = copy.deepcopy(reward_model)
    reward_model.config.reward_bias = value_model.config.reward_bias = 0.4
    reward_model.requires_grad_(False)
    args = ppo.parse_args(["--init", "-", "--kl_ref", "-", "--sft", "-", "--reward_model", "-",
                           "--out", "-", "--batch_size", "8", "--updates", "5", "--lr", "1e-3"])
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value_model.parameters()), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0 - u / args.updates)
    policy_before = [p.detach().clone() for p in policy.parameters()]
    value_before = [p.detach().clone() for p in value_model.parameters()]
    task = T.ToyTask()
    prompts = task.ppo_prompts(8, seed=3)
    gen = torch.Generator().manual_seed(3)
    models = ppo.PPOModels(policy, value_model, kl_ref=policy, rm=reward_model, sft=None)
    row = ppo.ppo_update(1, prompts, models, tokenizer, opt, sched, gen, args, task,
                         train_policy=False)
    assert all(torch.equal(a, b) for a, b in zip(policy_before, policy.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(value_before, value_model.parameters()))
    assert sched.last_epoch == 0 and row["lr"] == pytest.approx(1e-3)
    assert row["value_loss"] > 0 and row["policy_loss"] is None and row["entropy"] is None
    # an ordinary update moves the policy and advances the schedule
    ppo.ppo_update(2, prompts, models, tokenizer, opt, sched, gen, args, task)
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, policy.parameters()))
    assert sched.last_epoch == 1


# ----------------------------------------------------------------------------------------------
# 11. Whitening
# ----------------------------------------------------------------------------------------------
def test_masked_whiten_uses_real_tokens_only():
    g = torch.Generator().manual_seed(0)
    lengths = [2, 6, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths])
    x = torch.randn(4, 6, generator=g) * 2 + 3
    x = torch.where(mask.bool(), x, torch.full_like(x, 1000.0))        # pads would dominate
    out = ppo.masked_whiten(x, mask)
    real = np.array([v for row, n in zip(x.tolist(), lengths) for v in row[:n]], dtype=np.float64)
    expected = (real - real.mean()) / np.sqrt(real.var() + 1e-8)
    got = np.array([v for row, n in zip(out.tolist(), lengths) for v in row[:n]])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert got.mean() == pytest.approx(0.0, abs=1e-6)
    assert got.var() == pytest.approx(1.0, abs=1e-5)
    assert out[~mask.bool()].abs().max().item() == 0.0


# ----------------------------------------------------------------------------------------------
# 12. Sampling
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_query(ids):
    pad, eos, words = ids
    rng = random.Random(2)
    return left_pad([[words[0]] + rng.sample(words[1:], rng.randint(0, 4)) for _ in range(16)], pad)


def test_sampling_is_deterministic_given_the_generator(policy, ids, sample_query):
    pad, eos, _ = ids
    draw = lambda seed: C.sample(policy, sample_query, pad, eos, T.RESPONSE_LEN, 0.7,   # noqa: E731
                                 torch.Generator().manual_seed(seed))
    (r1, l1), (r2, l2), (r3, _) = draw(11), draw(11), draw(12)
    assert torch.equal(r1, r2) and torch.equal(l1, l2)
    assert not torch.equal(r1, r3)


def test_sampled_responses_are_padded_after_the_first_eos(policy, ids, sample_query):
    pad, eos, _ = ids
    response, _ = C.sample(policy, sample_query, pad, eos, T.RESPONSE_LEN, 1.0,
                           torch.Generator().manual_seed(3))
    ended_early = 0
    for row in response.tolist():
        if eos in row:
            first = row.index(eos)
            assert all(tok == pad for tok in row[first + 1:])
            ended_early += first < len(row) - 1
    assert ended_early > 0, "no response ended before the last position: the test checks nothing"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_a_full_forward(policy, ids, sample_query, temperature):
    pad, eos, _ = ids
    response, logp = C.sample(policy, sample_query, pad, eos, T.RESPONSE_LEN, temperature,
                              torch.Generator().manual_seed(4))
    mask = C.response_mask(response, eos)
    assert (~mask).any(), "no padded response: the test would not check the zeros on pads"
    with torch.no_grad():
        full = C.gather_logprobs(C.response_logits(policy, sample_query, response, pad, eos,
                                                   temperature), response)
    torch.testing.assert_close(logp[mask], full[mask], rtol=0, atol=1e-5)
    assert logp[~mask].abs().max().item() == 0.0
    # and independently of response_logits: the token-by-token loop on the unpadded sequence
    for b in range(len(sample_query)):
        prompt = [t for t in sample_query[b].tolist() if t != pad]
        expected = brute_force_logprobs(policy, prompt, response[b].tolist(), eos, temperature)
        np.testing.assert_allclose(logp[b, :len(expected)].double().numpy(), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 13. OCRM diagnostic: pairwise accuracy on fresh policy samples
# ----------------------------------------------------------------------------------------------
def brute_force_policy_pair_accuracy(rms, policy, tokenizer, num_prompts, seed, batch_size=512):
    """Each RM's accuracy vs gold on two T = 1.0 samples per held-out prompt, one prompt at a time.

    The pairs come from common.sample with the diagnostic's generator seed, drawn in the same
    chunks of `batch_size` prompts (sampling is tested above); everything after that is a Python loop over unpadded sequences: the words decoded by
    hand for the gold reward, and a plain forward of the RM on prompt + response up to its EOS,
    read at that EOS (minus the RM's reward_bias), or -1 for a response that never ends.
    """
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = T.ToyTask().eval_examples(num_prompts)[0]
    query = C.encode_prompts(tokenizer, prompts)
    generator = torch.Generator().manual_seed(seed)
    pair = [sum((C.sample(policy, q, pad, eos, T.RESPONSE_LEN, 1.0, generator)[0].tolist()
                 for q in query.split(batch_size)), []) for _ in range(2)]
    agree = {name: 0 for name in rms}
    untied = 0
    for b, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        gold, score = [], {name: [] for name in rms}
        for response in (pair[0][b], pair[1][b]):
            tokens = real_tokens(response, eos)
            ended = tokens[-1] == eos
            words = tokenizer.convert_ids_to_tokens([t for t in tokens if t != eos])
            gold.append(T.ToyTask().gold_reward(prompt, " ".join(words), ended))
            for name, rm in rms.items():
                if not ended:
                    score[name].append(-1.0)
                    continue
                with torch.no_grad():
                    hidden = rm.base_model(input_ids=torch.tensor([prompt_ids + tokens])).last_hidden_state
                    score[name].append(rm.score(hidden[0, -1]).item()
                                       - getattr(rm.config, "reward_bias", 0.0))
        if gold[0] == gold[1]:
            continue                                     # a tie in gold has no right order
        untied += 1
        for name in rms:                                 # the RM orders the pair as gold does
            agree[name] += (score[name][0] - score[name][1]) * (gold[0] - gold[1]) > 0
    return {"num_untied_pairs": untied, **{name: agree[name] / untied for name in rms}}


def test_policy_pair_accuracy_matches_a_per_prompt_loop(policy, tokenizer, reward_model):
    """Two RMs that differ only in reward_bias: they rank two ended responses alike but an ended
    one against a never-ending one (-1) differently, so the two accuracies must differ too."""
    reward_model.config.reward_bias = 0.3
    shifted = copy.deepcopy(reward_model)
    shifted.config.reward_bias = 2.0
    rms = {"before": reward_model, "after": shifted}
    got = OC.policy_pair_accuracy(rms, policy, tokenizer, T.ToyTask(), num_prompts=64, seed=5,
                                  device=torch.device("cpu"), batch_size=24)   # uneven chunks
    expected = brute_force_policy_pair_accuracy(rms, policy, tokenizer, num_prompts=64, seed=5,
                                                batch_size=24)
    assert set(got) == {"num_untied_pairs", "before", "after"}
    assert got["num_untied_pairs"] == expected["num_untied_pairs"] > 0
    assert expected["before"] != expected["after"], "the -1 of a never-ending response is untested"
    for name in rms:
        assert got[name] == pytest.approx(expected[name], abs=1e-6), name


# ----------------------------------------------------------------------------------------------
# 14. Pairs sampled at another temperature (reward_model.py --pair_temperature)
# ----------------------------------------------------------------------------------------------
def test_pairs_at_another_temperature_store_the_density_they_were_drawn_from(policy, tokenizer):
    """logp_sft_* of pairs sampled at T = 1.5 is the log-density at 1.5 of each stored response
    (what OCRM's weights must divide by), recomputed one token at a time; and the sampler really
    ran at 1.5: the same generator at T = 1.0 draws other responses."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    task, n = T.ToyTask(), 16
    hot = RM.sample_preferences(policy, tokenizer, task, n, "argmax", 5, "cpu", temperature=1.5)
    cold = RM.sample_preferences(policy, tokenizer, task, n, "argmax", 5, "cpu")
    gaps = []
    for row in hot.select(range(4)):
        prompt = [t for t in row["prompt_ids"] if t != pad]
        for side in ("chosen", "rejected"):
            at_hot = sum(brute_force_logprobs(policy, prompt, row[f"{side}_ids"], eos, 1.5))
            at_one = sum(brute_force_logprobs(policy, prompt, row[f"{side}_ids"], eos, 1.0))
            assert row[f"logp_sft_{side}"] == pytest.approx(at_hot, abs=1e-4)
            gaps.append(abs(at_hot - at_one))
    assert max(gaps) > 0.05, "T = 1.5 and 1.0 give the same log-probs: the check above is empty"
    assert hot["prompt"] == cold["prompt"]
    pairs = lambda d: sorted(zip(d["chosen_ids"], d["rejected_ids"]))   # noqa: E731
    assert pairs(hot) != pairs(cold)


def test_same_weights_is_about_the_parameters_not_the_directory(policy, tmp_path):
    """ppo.py skips the second KL forward when the KL reference is the SFT policy: decided from
    the weights, so a copy of SFT in another directory counts as SFT, and a policy one step away
    does not."""
    from transformers import GPT2LMHeadModel
    for name in ("a", "b"):
        policy.save_pretrained(tmp_path / name)
    a, b = (GPT2LMHeadModel.from_pretrained(tmp_path / n) for n in ("a", "b"))
    assert C.same_weights(a, b) and C.same_weights(policy, b)
    with torch.no_grad():
        p = next(b.parameters())
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(math.inf))   # one ulp
    assert not C.same_weights(a, b)
    shallower = GPT2LMHeadModel(type(policy.config)(**{**policy.config.to_dict(), "n_layer": 1}))
    assert not C.same_weights(a, shallower)


def test_eager_and_sdpa_attention_are_the_same_function(tokenizer, ids, layout_batch):
    """The speed choices of the embedded GPT-2 (sft.py: eager attention, stored under
    common.ATTENTION_KEY; the fused tanh GELU) against their simple equivalents (the library's
    SDPA; GPT-2's own gelu_new): the same logits on a left-padded batch, up to float rounding."""
    from transformers import GPT2LMHeadModel
    from conftest import tiny_config
    *_, query, response = layout_batch
    seq = torch.cat([query, response], dim=1)
    mask = (seq != ids[0]).long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = {}
    for attention, act in (("sdpa", "gelu_new"), ("eager", "gelu_new"), ("eager", "gelu_pytorch_tanh"),
                           ("eager", "gelu")):      # the erf GELU: a different function
        torch.manual_seed(0)
        model = GPT2LMHeadModel(tiny_config(tokenizer, activation_function=act)).eval()
        model.set_attn_implementation(attention)
        with torch.no_grad():
            logits[attention, act] = model(input_ids=seq, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    reference = logits["sdpa", "gelu_new"][real]
    erf = logits.pop(("eager", "gelu"))[real]      # the tolerance below does tell it apart
    assert not torch.allclose(erf, reference, rtol=1e-5, atol=1e-5)
    for key, value in logits.items():
        torch.testing.assert_close(value[real], reference, rtol=1e-5, atol=1e-5, msg=str(key))
