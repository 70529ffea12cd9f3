"""The offline baselines of dpo.py (DPO, WPO) against independent computations.

    python -m pytest tests/test_dpo.py -q
"""
import copy
import math

import numpy as np
import pytest
import torch

import common as C
import dpo
from test_math import brute_force_logprobs, layout_batch, real_tokens  # noqa: F401  (fixture)


def test_dpo_loss_by_hand_on_two_pairs():
    beta = 0.5
    # pair 1: policy gains 1.0 on chosen, loses 0.5 on rejected: margin 0.5 * (1.0 + 0.5) = 0.75
    # pair 2: policy loses 0.4 on chosen, gains 0.4 on rejected: margin 0.5 * (-0.8) = -0.4
    logp_c, ref_c = torch.tensor([-3.0, -5.4]), torch.tensor([-4.0, -5.0])
    logp_r, ref_r = torch.tensor([-6.5, -6.6]), torch.tensor([-6.0, -7.0])
    loss, reward_c, reward_r = dpo.dpo_loss(logp_c, logp_r, ref_c, ref_r, beta)
    softplus = lambda x: math.log1p(math.exp(-x))                      # -log sigmoid(x)  # noqa: E731
    assert loss.item() == pytest.approx((softplus(0.75) + softplus(-0.4)) / 2, abs=1e-6)
    assert reward_c.tolist() == pytest.approx([0.5, -0.2])
    assert reward_r.tolist() == pytest.approx([-0.25, 0.2])
    weighted, *_ = dpo.dpo_loss(logp_c, logp_r, ref_c, ref_r, beta, torch.tensor([1.0, 0.25]))
    assert weighted.item() == pytest.approx((softplus(0.75) + 0.25 * softplus(-0.4)) / 2, abs=1e-6)
    # --wpo 0 is weight None: the same as weights of 1
    ones, *_ = dpo.dpo_loss(logp_c, logp_r, ref_c, ref_r, beta, torch.ones(2))
    assert ones.item() == loss.item()


def test_at_the_start_the_loss_is_log_2_and_the_implicit_rewards_are_0(policy, ids, layout_batch):
    pad, eos, _ = ids
    _, responses, query, chosen = layout_batch
    rejected = chosen.flip(0)
    reference = copy.deepcopy(policy)
    logp = [C.response_logprob_sums(m, query, y, pad, eos) for m in (policy, reference)
            for y in (chosen, rejected)]
    loss, reward_c, reward_r = dpo.dpo_loss(logp[0], logp[1], logp[2], logp[3], beta=0.05)
    assert loss.item() == torch.tensor(math.log(2)).item()          # log 2, in float32, exactly
    assert reward_c.abs().max().item() == 0.0 and reward_r.abs().max().item() == 0.0


def test_dpo_sequence_logprobs_count_exactly_the_response_tokens_up_to_the_eos(policy, ids,
                                                                             layout_batch):
    """Left-padded prompts and tokens after the EOS are in the tensors; the sums must equal a
    token-by-token loop over each unpadded prompt and its response up to the first EOS (a mask
    that kept the prompt's pads or the post-EOS tokens, as the authors' does, fails this)."""
    pad, eos, _ = ids
    prompts, responses, query, response = layout_batch
    assert (query == pad).any() and (~C.response_mask(response, eos)).any()
    got = C.response_logprob_sums(policy, query, response, pad, eos)
    assert got.requires_grad or not torch.is_grad_enabled()
    expected = [sum(brute_force_logprobs(policy, p, r, eos, 1.0)) for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(got.detach().double().numpy(), expected, atol=1e-4)


def test_wpo_weight_against_a_float64_computation_from_the_logits(policy, ids, layout_batch):
    pad, eos, _ = ids
    prompts, responses, query, chosen = layout_batch
    rejected = chosen.flip(0)
    got = dpo.wpo_weights(policy, query, chosen, rejected, pad, eos)

    def a(prompt, response):              # mean over real tokens of log p(y_t) - log sum_v p(v)^2
        context, terms = list(prompt), []
        for tok in real_tokens(response, eos):
            with torch.no_grad():
                logits = policy(input_ids=torch.tensor([context])).logits[0, -1].double()
            p = torch.softmax(logits, dim=-1)
            terms.append(math.log(p[tok].item()) - math.log((p ** 2).sum().item()))
            context.append(tok)
        return sum(terms) / len(terms)

    expected = [min(1.0, math.exp(a(p, c) + a(p, r)))
                for p, c, r in zip(prompts, chosen.tolist(), rejected.tolist())]
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-4, atol=1e-6)
    assert (got <= 1.0).all() and (got > 0).all()


def test_the_clamp_at_1_holds_for_a_policy_sure_of_both_responses(ids):
    """A policy that gives every next token probability p ~ 1 has log p - log sum_v p(v)^2 =
    -log p + (a little) > 0 per token, so exp(a(y_c) + a(y_r)) > 1: the weight is clamped to 1."""
    pad, eos, words = ids
    V = 30

    class KnowsTheNextToken(torch.nn.Module):     # logit 6 on the token that comes next, 0 else
        def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
            logits = torch.zeros(*input_ids.shape, V)
            logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 6.0)
            return type("Out", (), {"logits": logits[:, -logits_to_keep:]})()

    query = torch.tensor([[words[0], words[2]]])
    response = torch.tensor([[words[1], words[3], eos, pad]])
    p = math.exp(6) / (math.exp(6) + V - 1)                  # of the true token, every position
    per_token = math.log(p) - math.log(p ** 2 + (V - 1) * ((1 - p) / (V - 1)) ** 2)
    assert math.exp(2 * per_token) > 1.0                     # unclamped, the weight would be > 1
    w = dpo.wpo_weights(KnowsTheNextToken(), query, response, response, pad, eos)
    assert w.item() == 1.0
