"""The paper's argument in miniature: a contextual bandit where everything is exact or cheap.

The world (one prompt, so "contextual" collapses to a single context; constants from a
feasibility study, unchanged except the logit noise scale 0.5, which the study left open):
- 200 candidate responses y, each with two features: quality q ~ U(0, 1) and length L ~ U(0, 10).
- Gold reward, concave in length: gold(y) = q + L - 0.12 L^2 (longer helps up to L ~ 4.2,
  then hurts).
- The proxy RM is linear, r_theta(y) = a q + b L: it cannot represent the bend, so it is
  MISSPECIFIED, and its best fit depends on which lengths the data covers (docs/method.md section 1).
- pi_0 (the "SFT" policy) = softmax(-0.5 L + N(0, 0.5^2) noise): short answers are common,
  long ones rare but present (every response has positive probability, so the importance
  weights exist).
- Data D: N = 5000 pairs drawn i.i.d. from pi_0 x pi_0, each labelled by a Bradley-Terry draw
  on gold, P(y_0 > y_1) = sigmoid(gold(y_0) - gold(y_1)).
- RM fit: minimise the project's own `reward_model.bt_loss` (optionally with a weight tensor)
  over theta = (a, b), float64, L-BFGS to convergence (the loss is convex in theta).
- Policy step (the KL-regularised optimum that PPO approximates):
  pi_{k+1}(y) proportional to pi_k(y) * exp(ETA * r_k(y)), ETA = 1.

The argument, one test per step:
1. Covariate shift makes plain BT inconsistent. On pi_0 (mostly short answers) longer is better,
   so the fit on D gives a clearly positive length slope b. One policy step moves mass to longer
   answers, where the gold curve is flat or falling; the BT fit on pi_1's own pairs (the exact
   population fit, i.e. N -> infinity, by enumerating all 200 x 200 pairs) has a much smaller b
   (a gap of many standard errors), and the pi_0 fit's exact BT loss on pi_1's pairs is clearly
   higher. (Its gold-ranking accuracy on pi_1's pairs is NOT lower, it is higher: a steeper length
   slope still ranks the mostly-short pi_1 pairs well. BT is consistent for the probabilities
   P(y_c > y_r), and the policy step uses reward magnitudes, so the loss is the right yardstick.)
2. Importance weighting fixes it without new labels. E_pi0[w * loss] = E_pi1[loss] for
   w = pi_1(y_c) pi_1(y_r) / (pi_0(y_c) pi_0(y_r)) = `ocrm_correct.pair_weights(..., alpha=0,
   lam=1)`; checked exactly by enumeration. So the weighted fit on the SAME pi_0 pairs lands
   on the pi_1 fit, within its own sampling error (sandwich standard errors of a weighted
   M-estimator, 3 s.e.), while the unweighted fit is many standard errors away; its excess BT
   loss on pi_1's pairs is under a tenth of the unweighted fit's.
3. Iterating it helps the policy. K = 3 rounds: plain RLHF keeps pushing against RM_1 and runs
   into the too-long region (overoptimisation: on 3 of 5 seeds its gold ends BELOW pi_0's);
   OCRM refits the RM each round on D with the authors' tempered weights (alpha = 0.1,
   lam = 0.5, ESS checked) and ends with higher exact expected gold on every one of 5 seeds.
   Both arms start from pi_0 with RM_1 and take K steps of the same size ETA, each from its own
   current policy, so they differ only in the RM used in rounds 2..K (the bandit analogue of the
   "PPO + new KL" control).

Each claim can fail (checked by patching the constants or `pair_weights`): with lam = 0 (all
weights 1) the identity breaks, test 2's weighted fit is the unweighted one and misses the pi_1
fit by many standard errors, and test 3's two arms coincide; alpha = 0.1 also breaks the identity.
With a smaller step (ETA = 0.5) the shift is too small: tests 1, 2 and 3 all fail (OCRM no longer
beats plain RLHF). With lam = 1 in test 3 the ESS falls to 0.28 on one seed and the ESS guard
fails. Everything runs in well under a second after the imports; nothing is printed. Run with

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_bandit.py
"""
import functools

import numpy as np
import torch

import ocrm_correct as OC
import reward_model as RM

NUM_RESPONSES = 200
NUM_PAIRS = 5000              # |D|, pairs drawn from pi_0 x pi_0
ETA = 1.0                     # policy step size: pi_{k+1} ~ pi_k exp(ETA r_k)
ROUNDS = 3                    # K
ALPHA, LAM = 0.1, 0.5         # OCRM tempering in test 3 (docs/method.md section 2)
SEEDS = range(5)


# ----------------------------------------------------------------------------------------------
# The bandit
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def world(seed: int):
    """Responses, gold, log pi_0 and the labelled pairs D for one seed (all float64 tensors)."""
    rng = np.random.default_rng(seed)
    quality = rng.uniform(0.0, 1.0, NUM_RESPONSES)
    length = rng.uniform(0.0, 10.0, NUM_RESPONSES)
    gold = quality + length - 0.12 * length ** 2                       # concave in L, peak ~4.2
    logits = -0.5 * length + rng.normal(0.0, 0.5, NUM_RESPONSES)       # pi_0 favours short answers
    logp_sft = torch.log_softmax(torch.tensor(logits), 0)              # (200,)
    features = torch.tensor(np.stack([quality, length], 1))            # (200, 2): (q, L)
    gold = torch.tensor(gold)
    # D: (y_0, y_1) ~ pi_0 x pi_0, label by a BT draw on gold
    p = logp_sft.exp().numpy()
    y0, y1 = (rng.choice(NUM_RESPONSES, NUM_PAIRS, p=p / p.sum()) for _ in range(2))
    first_wins = rng.uniform(size=NUM_PAIRS) < torch.sigmoid(gold[y0] - gold[y1]).numpy()
    chosen = torch.tensor(np.where(first_wins, y0, y1))                # (N,) response ids
    rejected = torch.tensor(np.where(first_wins, y1, y0))              # (N,)
    return features, gold, logp_sft, chosen, rejected


def all_pairs(logp, gold):
    """Every ordered (chosen i, rejected j) with its probability under pi x pi and BT labels.

    (y_0, y_1) ~ pi x pi, and i beats j with prob sigmoid(g_i - g_j); both orders of drawing
    give (chosen = i, rejected = j), so P(i, j) = 2 pi(i) pi(j) sigmoid(g_i - g_j) for i != j
    (i = j contributes the constant log 2 and is left out). Sums to 1 over i != j.
    """
    i, j = torch.meshgrid(torch.arange(NUM_RESPONSES), torch.arange(NUM_RESPONSES), indexing="ij")
    keep = i != j
    i, j = i[keep], j[keep]                                            # (200*199,)
    prob = 2 * torch.exp(logp[i] + logp[j]) * torch.sigmoid(gold[i] - gold[j])
    return i, j, prob


def fit_rm(features, chosen, rejected, weight=None):
    """theta = argmin bt_loss(r_theta(y_c), r_theta(y_r), weight), r_theta(y) = a q + b L."""
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        score = features @ theta                                       # (200,)
        loss = RM.bt_loss(score[chosen], score[rejected], weight)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def population_fit(features, gold, logp):
    """BT fit on infinitely many pi x pi pairs: bt_loss over all pairs, w = P(i, j)."""
    i, j, prob = all_pairs(logp, gold)
    return fit_rm(features, i, j, prob * len(prob))                    # bt_loss takes a mean


def sandwich_se(features, chosen, rejected, theta, weight):
    """Standard errors of the weighted BT estimate: cov = H^-1 G H^-1 / N (weighted M-estimator).

    Per pair, d = x_c - x_r, m = theta . d: grad of -log sigmoid(m) = -(1 - sigmoid(m)) d,
    Hessian = sigmoid(m)(1 - sigmoid(m)) d d^T;
    H = mean w * Hessian, G = mean (w * grad)(w * grad)^T.
    """
    d = features[chosen] - features[rejected]                          # (N, 2)
    s = torch.sigmoid(d @ theta)                                       # (N,)
    grad = -(weight * (1 - s))[:, None] * d                            # (N, 2)
    hess = ((weight * s * (1 - s))[:, None, None] * d[:, :, None] * d[:, None, :]).mean(0)
    h_inv = torch.linalg.inv(hess)
    cov = h_inv @ (grad.T @ grad / len(d)) @ h_inv / len(d)
    return cov.diagonal().sqrt()


def policy_step(logp, features, theta):
    """log pi_{k+1} = log pi_k + ETA r_theta - log Z: the KL-regularised best response."""
    return torch.log_softmax(logp + ETA * (features @ theta), 0)


def expected_gold(logp, gold) -> float:
    return (logp.exp() * gold).sum().item()                            # sum_y pi(y) gold(y)


def pair_accuracy(theta, features, gold, logp) -> float:
    """P_{pi x pi}(RM orders a pair as gold does) over pairs with g_i != g_j."""
    i, j, _ = all_pairs(logp, gold)
    pair_prob = torch.exp(logp[i] + logp[j])
    score = features @ theta
    agree = ((score[i] - score[j]) * (gold[i] - gold[j]) > 0).double()
    return ((pair_prob * agree).sum() / pair_prob.sum()).item()


def bt_loss_on_policy(theta, features, gold, logp) -> float:
    """E_{pi x pi}[-log sigmoid(r(y_c) - r(y_r))], exact: what BT on pi's pairs minimises."""
    i, j, prob = all_pairs(logp, gold)
    score = features @ theta
    return RM.bt_loss(score[i], score[j], prob * len(prob)).item()


def importance_weights(logp_policy, logp_sft, chosen, rejected, alpha, lam):
    return OC.pair_weights(logp_policy[chosen], logp_policy[rejected],
                           logp_sft[chosen], logp_sft[rejected], alpha=alpha, lam=lam)


@functools.lru_cache(maxsize=None)
def first_step(seed: int):
    """RM_1 (plain BT on D), pi_1, and the exact BT fit on pi_1's own pairs."""
    features, gold, logp_sft, chosen, rejected = world(seed)
    theta_sft = fit_rm(features, chosen, rejected)
    logp_1 = policy_step(logp_sft, features, theta_sft)
    theta_shifted = population_fit(features, gold, logp_1)
    return theta_sft, logp_1, theta_shifted


# ----------------------------------------------------------------------------------------------
# 1. Plain BT is inconsistent for the shifted policy
# ----------------------------------------------------------------------------------------------
def test_bt_fit_on_sft_pairs_is_inconsistent_for_the_shifted_policy():
    for seed in SEEDS:
        features, gold, _, chosen, rejected = world(seed)
        theta_sft, logp_1, theta_shifted = first_step(seed)
        se_sft = sandwich_se(features, chosen, rejected, theta_sft, torch.ones(NUM_PAIRS))
        # on pi_0's short answers length looks good; on pi_1's it has mostly stopped helping:
        # a gap of many standard errors, so not sampling noise but a different target
        assert theta_sft[1] > 2 * theta_shifted[1], (seed, theta_sft, theta_shifted)
        assert theta_sft[1] - theta_shifted[1] > 5 * se_sft[1], (
            seed, theta_sft, theta_shifted, se_sft)
        # the pi_0 fit's BT loss on pi_1's pairs (exact) is clearly above the best linear RM's
        excess = bt_loss_on_policy(theta_sft, features, gold, logp_1) - bt_loss_on_policy(
            theta_shifted, features, gold, logp_1)
        assert excess > 0.005, (seed, excess)
        # ranking accuracy is NOT what goes wrong: the pi_0 fit, with its steeper length slope,
        # still orders pi_1's pairs by gold more often (most of pi_1 is still left of the peak).
        # BT is consistent for P(y_c > y_r), and the policy step uses reward magnitudes.
        assert (pair_accuracy(theta_sft, features, gold, logp_1)
                > pair_accuracy(theta_shifted, features, gold, logp_1)), seed


# ----------------------------------------------------------------------------------------------
# 2. Importance-weighted BT on the same pairs targets the shifted policy
# ----------------------------------------------------------------------------------------------
def test_weighted_loss_on_sft_pairs_equals_loss_on_policy_pairs():
    """E_{pi_0 x pi_0}[w * loss] = E_{pi_1 x pi_1}[loss], by exact enumeration, for a fixed RM."""
    features, gold, logp_sft, *_ = world(0)
    _, logp_1, _ = first_step(0)
    theta = torch.tensor([0.7, 0.3], dtype=torch.float64)              # any fixed RM
    score = features @ theta
    i, j, prob_sft = all_pairs(logp_sft, gold)
    _, _, prob_1 = all_pairs(logp_1, gold)
    n = len(i)
    on_policy = RM.bt_loss(score[i], score[j], prob_1 * n).item()
    w = importance_weights(logp_1, logp_sft, i, j, alpha=0.0, lam=1.0)
    reweighted = RM.bt_loss(score[i], score[j], w * prob_sft * n).item()
    assert abs(reweighted - on_policy) < 1e-10 * on_policy, (reweighted, on_policy)
    # the tempered weights trade this exactness for variance: they target something else
    for alpha, lam in ((0.1, 1.0), (0.0, 0.5)):
        w = importance_weights(logp_1, logp_sft, i, j, alpha=alpha, lam=lam)
        tempered = RM.bt_loss(score[i], score[j], w * prob_sft * n).item()
        assert abs(tempered - on_policy) > 1e-3, (alpha, lam, tempered, on_policy)


def test_weighted_fit_on_sft_pairs_matches_the_fit_on_policy_pairs():
    for seed in SEEDS:
        features, gold, logp_sft, chosen, rejected = world(seed)
        theta_sft, logp_1, theta_shifted = first_step(seed)
        w = importance_weights(logp_1, logp_sft, chosen, rejected, alpha=0.0, lam=1.0)
        theta_weighted = fit_rm(features, chosen, rejected, w)
        se_weighted = sandwich_se(features, chosen, rejected, theta_weighted, w)
        # the weighted estimate is within its own sampling error of the pi_1 fit ...
        assert ((theta_weighted - theta_shifted).abs() < 3 * se_weighted).all(), (
            seed, theta_weighted, theta_shifted, se_weighted)
        # ... its length slope is much closer than the plain one's (test 1: > 5 s.e. off) ...
        assert ((theta_weighted[1] - theta_shifted[1]).abs()
                < 0.25 * (theta_sft[1] - theta_shifted[1]).abs()), (seed, theta_weighted, theta_sft)
        # ... and its excess BT loss on pi_1's pairs is a small fraction of the plain fit's
        best = bt_loss_on_policy(theta_shifted, features, gold, logp_1)
        excess_weighted = bt_loss_on_policy(theta_weighted, features, gold, logp_1) - best
        excess_plain = bt_loss_on_policy(theta_sft, features, gold, logp_1) - best
        assert excess_weighted < 0.1 * excess_plain, (seed, excess_weighted, excess_plain)


# ----------------------------------------------------------------------------------------------
# 3. Iterated OCRM ends with a better policy than plain RLHF
# ----------------------------------------------------------------------------------------------
def run_loop(seed: int, correct: bool):
    """K rounds of pi_{k+1} ~ pi_k exp(ETA r_k); r_k = RM_1 (plain) or refitted on D (OCRM)."""
    features, gold, logp_sft, chosen, rejected = world(seed)
    theta, *_ = first_step(seed)                                       # RM_1: w = 1 in both arms
    logp, ess = logp_sft, []
    for k in range(ROUNDS):
        if correct and k > 0:                                          # RM_k on the SAME D
            w = importance_weights(logp, logp_sft, chosen, rejected, alpha=ALPHA, lam=LAM)
            ess.append(OC.effective_sample_size(w))
            theta = fit_rm(features, chosen, rejected, w)
        logp = policy_step(logp, features, theta)
    return expected_gold(logp, gold), ess


def test_ocrm_final_gold_beats_plain_rlhf():
    for seed in SEEDS:
        gold_plain, _ = run_loop(seed, correct=False)
        gold_ocrm, ess = run_loop(seed, correct=True)
        assert min(ess) > 0.5, (seed, ess)                             # the weights stay usable
        assert gold_ocrm > gold_plain + 0.04, (seed, gold_ocrm, gold_plain)
