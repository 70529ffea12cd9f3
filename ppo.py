"""Stage 3: PPO against a reward model with a KL penalty (docs/method.md sections 3-4).

One call runs one PPO stage: the policy starts at --init, the KL penalty pulls towards --kl_ref,
the reward comes from --reward_model, and the value model is a fresh copy of that RM. The three
arms of run_all.sh differ only in what they pass here (KL reference, reward model).

Per update (numbered as in the code below):
 1. sample B responses at T = 0.7 (fixed length R, everything after the first EOS is padding)
 2. score: log pi_old and log pi_ref per token (logits / 0.7), values V_old, RM score at the EOS;
    a response with no EOS gets the score -1
 3. per-token reward  r_t = -beta * (log pi_old(y_t) - log pi_ref(y_t))   (k1 estimator)
                      r_T += RM score                                       (last real token)
 4. GAE (gamma = 1, lambda = 0.95): delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = sum_l (gamma lambda)^l delta_{t+l},  returns = A + V_old;  A whitened over real tokens
 5. 4 epochs x minibatches of the clipped surrogate and the clipped value loss:
      L_pg = E[ max(-A ratio, -A clip(ratio, 1 - 0.2, 1 + 0.2)) ],  ratio = pi / pi_old
      L_vf = 0.5 E[ max((V - R)^2, (clip(V, V_old +- 0.2) - R)^2) ],   L = L_pg + 0.1 L_vf
    AdamW, learning rate decayed linearly to 0 over the stage.
Every --eval_every updates: gold and proxy reward and KL to SFT on a fixed held-out prompt set
(T = 0.7 samples). At the end: near-greedy (T = 0.01) gold, gold win rates against the SFT
policy's near-greedy responses to the same prompts and against the task's reference responses.
The task (prompts, response length, gold reward: the embedded program or a gold RM) is the one
sft.py wrote to --sft/task.json.

In : --init, --kl_ref, --sft (policies), --reward_model (RM)
Out: --out  the policy as a Hugging Face directory, plus metrics.jsonl (one line per update),
     eval.jsonl (the held-out curve), final.json (the final evaluation), ppo_info.json

    python ppo.py --init runs/toy-seed1/sft --kl_ref runs/toy-seed1/sft --sft runs/toy-seed1/sft \\
        --reward_model runs/toy-seed1/rm_1 --out runs/toy-seed1/ppo_1

The value model is a copy of the RM read at every state, centring included (common.centred_head),
as the authors' critic is; --critic_warmup N fits it alone for N updates before the policy moves.

Departures: rewards are not whitened and the KL coefficient is constant, as in the N+ details;
rollout log-probs are reused from sampling in fp32 (the same numbers as a second forward pass, up to
float rounding; under bf16 autocast they are recomputed by the training forward's code path);
the reward is added at the EOS token, the textbook form (the authors add it at EOS + 1); the
embedded task's ~100k-parameter policy needs lr 1e-4 instead of 3e-6 and uses beta 0.1 instead of
the paper's 0.05 (presets pass 0.05): docs/experiments.md has the measurements.
"""
import argparse
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification

import common as C
import task as T

WARMUP_SEED_OFFSET = 7919          # the critic warm-up's prompt stream: seed + this


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", required=True, help="policy to start from (sft.py or ppo.py output)")
    p.add_argument("--kl_ref", required=True, help="policy the KL penalty pulls towards")
    p.add_argument("--sft", required=True, help="SFT policy: KL to it is logged; eval baseline")
    p.add_argument("--reward_model", required=True, help="reward model (also initialises the value model)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=1, help="random seed (prompts, sampling)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--updates", type=int, default=100, help="PPO updates (batches) in this stage")
    p.add_argument("--batch_size", type=int, default=128,
                   help="episodes (prompts) per update (128 on the toy: docs/experiments.md v14 "
                        "says why)")
    p.add_argument("--minibatches", type=int, default=2, help="minibatches per PPO epoch")
    p.add_argument("--ppo_epochs", type=int, default=4, help="passes over each batch")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, linear decay to 0")
    p.add_argument("--beta", type=float, default=0.1,
                   help="KL penalty coefficient (the paper's TL;DR setting is 0.05, which the "
                        "presets pass; the embedded task uses 0.1: docs/experiments.md)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling/log-prob temperature")
    p.add_argument("--gamma", type=float, default=1.0, help="GAE discount")
    p.add_argument("--gae_lambda", type=float, default=0.95, help="GAE lambda")
    p.add_argument("--clip", type=float, default=0.2, help="policy ratio clip range")
    p.add_argument("--vf_clip", type=float, default=0.2, help="value clip range")
    p.add_argument("--vf_coef", type=float, default=0.1, help="value loss coefficient")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--no_eos_score", type=float, default=-1.0, help="score of a response with no EOS")
    p.add_argument("--critic_warmup", type=int, default=0,
                   help="value-only updates before the policy's first update (on rollouts of "
                        "their own; the policy does not move and the lr schedule does not start)")
    p.add_argument("--eval_every", type=int, default=10, help="updates between held-out evaluations")
    p.add_argument("--eval_prompts", type=int, default=C.EVAL_PROMPTS, help="size of the fixed held-out prompt set")
    p.add_argument("--micro_batch_size", type=int, default=0,
                   help="episodes per forward/backward inside a minibatch; gradients accumulate "
                        "(0: the whole minibatch at once)")
    p.add_argument("--gradient_checkpointing", type=int, default=0,
                   help="1: recompute policy and value activations in the backward pass")
    p.add_argument("--forward_batch_size", type=int, default=512,
                   help="sequences per no-grad forward in evaluation")
    args = p.parse_args(argv)
    if args.updates <= 0 or args.batch_size <= 0 or args.eval_every <= 0:
        raise C.StageError("--updates, --batch_size and --eval_every must be positive")
    if args.critic_warmup < 0:
        raise C.StageError("--critic_warmup must be >= 0")
    if args.minibatches <= 0 or args.ppo_epochs <= 0:
        raise C.StageError("--minibatches and --ppo_epochs must be positive")
    if args.batch_size % args.minibatches:
        raise C.StageError("--batch_size must be divisible by --minibatches")
    minibatch = args.batch_size // args.minibatches
    C.check_micro_batch(args.micro_batch_size, minibatch, f"the minibatch size ({minibatch})")
    if args.forward_batch_size <= 0:
        raise C.StageError("--forward_batch_size must be positive")
    return args


# ----------------------------------------------------------------------------------------------
# The math, as small functions the tests check against brute-force versions
# ----------------------------------------------------------------------------------------------
def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the real tokens only; pads stay out of the statistics.
    Under torchrun the statistics are the global batch's: each rank holds some rows, and the
    sums are added over ranks (C.all_sum is the identity with one process)."""
    n = C.all_sum(mask.sum())
    mean = C.all_sum((x * mask).sum()) / n
    var = C.all_sum(((x - mean) ** 2 * mask).sum()) / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def token_rewards(logp, logp_ref, score, mask, beta):
    """r_t = -beta (log pi - log pi_ref) on real tokens; the score is added at the last one."""
    rewards = -beta * (logp - logp_ref) * mask                                     # (B, R)
    last = mask.sum(dim=1).long() - 1                                               # (B,)
    return rewards.scatter_add(1, last.unsqueeze(1), score.unsqueeze(1))


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over the real tokens; values past the end count as 0."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last_adv = torch.zeros_like(rewards[:, 0])
    R = rewards.shape[1]
    for t in reversed(range(R)):             # a loop over R positions, batched over B
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]          # delta_t
        last_adv = delta + gamma * lam * last_adv                           # A_t = d_t + g l A_t+1
        advantages[:, t] = last_adv
    advantages = advantages * mask
    return advantages, (advantages + values) * mask                        # A, returns


def value_loss(values, values_old, returns, mask, vf_clip):
    """Clipped value loss 0.5 E[max((V - R)^2, (clip(V, V_old +- vf_clip) - R)^2)] (masked mean)."""
    v_clipped = values_old + (values - values_old).clamp(-vf_clip, vf_clip)
    return masked_mean(0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def ppo_losses(logp, logp_old, advantages, values, values_old, returns, mask, clip, vf_clip):
    """Clipped surrogate and clipped value loss (masked means); plus clipfrac and approx KL."""
    log_ratio = logp - logp_old
    ratio = torch.exp(log_ratio)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1).abs() > clip).float(), mask)
        # k3 estimator of KL(pi_old || pi): http://joschu.net/blog/kl-approx.html
        approx_kl = masked_mean(ratio - 1 - log_ratio, mask)
    return (masked_mean(pg, mask), value_loss(values, values_old, returns, mask, vf_clip),
            clipfrac, approx_kl)


def token_values(value_model, query, response, pad, eos):
    """V(state before response token t) for t = 0..R-1: the centred head at position P-1+t.

    The critic is the reward model itself, centring included (head - reward_bias, as the
    authors' critic is), so at the start of a stage it already predicts the centred reward
    instead of being off by the bias at every state."""
    P = query.shape[1]
    return C.head_scores(value_model, query, response, pad, eos)[:, P - 1:-1]   # (B, R)


@dataclass
class PPOModels:
    """The models of one PPO stage: two trained, three frozen."""
    policy: torch.nn.Module          # trained: pi, starts at --init
    value: torch.nn.Module           # trained: the critic, a copy of the RM
    kl_ref: torch.nn.Module          # frozen: the KL penalty's reference (--kl_ref)
    rm: torch.nn.Module              # frozen: the reward (--reward_model)
    sft: torch.nn.Module | None      # frozen: pi_sft for the logged KL to SFT; None when it is
    #                                  kl_ref itself (then KL to SFT = KL to the reference)


@dataclass
class Rollout:
    """One update's episodes (this rank's rows under torchrun) and what step 5 trains on."""
    query: torch.Tensor              # (b, P)
    response: torch.Tensor           # (b, R)
    mask: torch.Tensor               # (b, R) real response tokens, float
    logp_old: torch.Tensor           # (b, R) log pi_old at the sampling temperature
    values_old: torch.Tensor         # (b, R)
    advantages: torch.Tensor         # (b, R) whitened over the global batch
    returns: torch.Tensor            # (b, R)
    rows: slice                      # which rows of the global batch these are


def rollout(update, batch_prompts, models: PPOModels, tokenizer, gen, args, task):
    """Steps 1-4 on this rank's rows of the update's prompts: sample, score, rewards, advantages.
    Returns (the Rollout, per-row log columns gathered over ranks)."""
    policy, value_model, kl_ref, rm, sft = (models.policy, models.value, models.kl_ref, models.rm,
                                            models.sft)
    device = next(policy.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rows = C.shard(len(batch_prompts))              # all of them with one process
    query = C.encode_prompts(tokenizer, batch_prompts, task.max_prompt_len)[rows].to(device)

    # 1. rollout at T = 0.7; log pi_old comes with the samples (in fp32; see step 2 for bf16)
    policy.eval()
    value_model.eval()
    response, logp_old = C.sample(policy, query, pad, eos, task.response_len, args.temperature, gen,
                                  "ppo", update)
    mask = C.response_mask(response, eos).float()                               # (B, R)

    # 2. score the rollout with the frozen models and the value model
    with torch.no_grad(), C.autocast(device):
        if C.mixed_precision(device):
            # Under bf16 autocast the training forward (step 5) and the reference forward below
            # differ from the sampler's fp32 KV-cache path; both sides of the ratio pi / pi_old
            # and of the KL penalty must come from one code path and dtype, so log pi_old is
            # recomputed here exactly as step 5 computes log pi (in fp32 the sampler's values are
            # that already: tests/test_math.py)
            logits_old = C.response_logits(policy, query, response, pad, eos, args.temperature)
            logp_old = C.gather_logprobs(logits_old, response) * mask
        logits_ref = C.response_logits(kl_ref, query, response, pad, eos, args.temperature)
        logp_ref = C.gather_logprobs(logits_ref, response) * mask                  # (B, R)
        if sft is None:                                   # the KL reference is pi_sft
            logp_sft = logp_ref
        else:
            logits_sft = C.response_logits(sft, query, response, pad, eos, args.temperature)
            logp_sft = C.gather_logprobs(logits_sft, response) * mask
        values_old = token_values(value_model, query, response, pad, eos) * mask   # (B, R)
    score = C.score_responses(rm, query, response, pad, eos, args.no_eos_score)  # (B,)
    C.check_finite(score, "reward", "ppo", update)
    C.check_finite(values_old, "value", "ppo", update)

    # 3. per-token rewards: KL penalty on every real token, RM score on the last one
    rewards = token_rewards(logp_old, logp_ref, score, mask, args.beta)
    C.check_finite(rewards, "KL penalty", "ppo", update)      # the score is finite by now
    # 4. advantages and returns
    advantages, returns = gae(rewards, values_old, mask, args.gamma, args.gae_lambda)
    advantages = masked_whiten(advantages, mask)
    C.check_finite(advantages, "advantage", "ppo", update)

    texts, ended = C.decode_responses(tokenizer, response, eos)
    log = {"kl_to_ref": C.gather_rows(((logp_old - logp_ref) * mask).sum(1)),
           "kl_to_sft": C.gather_rows(((logp_old - logp_sft) * mask).sum(1)),
           "score": C.gather_rows(score), "length": C.gather_rows(mask.sum(1)),
           "texts": C.gather_rows(texts), "ended": C.gather_rows(ended),
           "tokens": C.all_sum((query != pad).sum() + mask.sum()).item()}
    return Rollout(query, response, mask, logp_old, values_old, advantages, returns, rows), log


def optimise(update, batch: Rollout, batch_size: int, models: PPOModels, opt, tokenizer, args,
             train_policy: bool = True) -> dict:
    """Step 5: PPO epochs over minibatches of the global batch of `batch_size` episodes.

    Each minibatch's loss is the token mean over ALL its real tokens: a micro-batch (or a
    torchrun rank's part) adds (its token sum) / (the minibatch's token count), so splitting a
    minibatch into pieces changes memory use, never the gradient. Under torchrun every rank
    draws the same permutation of the global rows and trains on the rows of each minibatch it
    holds; the gradients are then summed over ranks.
    train_policy=False: only the value loss (the critic warm-up)."""
    policy, value_model = models.policy, models.value
    device = batch.query.device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    mb_size = batch_size // args.minibatches
    params = [p for group in opt.param_groups for p in group["params"]]
    policy.train()
    value_model.train()
    stats = {"policy_loss": [], "value_loss": [], "clipfrac": [], "approx_kl": [], "entropy": []}
    for epoch in range(args.ppo_epochs):
        order = torch.randperm(batch_size, device=device)      # the same on every rank
        for k in range(args.minibatches):
            idx = order[k * mb_size:(k + 1) * mb_size]           # the minibatch (global rows)
            mine = (idx >= batch.rows.start) & (idx < batch.rows.stop)
            idx = idx[mine] - batch.rows.start                   # its rows held here (all: 1 process)
            tokens = C.all_sum(batch.mask[idx].sum())            # the minibatch's real tokens
            opt.zero_grad(set_to_none=True)
            pieces = idx.split(args.micro_batch_size or mb_size) if len(idx) else ()
            for mb in pieces:                # gradient accumulation (none: no rows on this rank)
                q, r, m = batch.query[mb], batch.response[mb], batch.mask[mb]
                share = m.sum() / tokens                        # 1.0 for a whole minibatch
                if not train_policy:         # critic warm-up: L = 0.1 L_vf, the policy stays put
                    with C.autocast(device):
                        values = token_values(value_model, q, r, pad, eos)               # (b, R)
                    vf_loss = value_loss(values, batch.values_old[mb], batch.returns[mb], m,
                                         args.vf_clip)
                    C.check_finite(vf_loss, "loss", "ppo", update)
                    (args.vf_coef * vf_loss * share).backward()
                    stats["value_loss"].append(vf_loss.item())
                    continue
                with C.autocast(device):
                    logits = C.response_logits(policy, q, r, pad, eos, args.temperature)  # (b, R, V)
                    values = token_values(value_model, q, r, pad, eos)                    # (b, R)
                logp = C.gather_logprobs(logits, r)
                pg_loss, vf_loss, clipfrac, approx_kl = ppo_losses(
                    logp, batch.logp_old[mb], batch.advantages[mb], values, batch.values_old[mb],
                    batch.returns[mb], m, args.clip, args.vf_clip)
                loss = pg_loss + args.vf_coef * vf_loss
                C.check_finite(loss, "loss", "ppo", update)
                (loss * share).backward()
                with torch.no_grad():
                    # entropy of pi( . | context) at each real position, averaged over tokens
                    p_log = torch.log_softmax(logits, dim=-1)
                    entropy = masked_mean(-(p_log.exp() * p_log).sum(-1), m)
                for key, v in zip(stats, (pg_loss, vf_loss, clipfrac, approx_kl, entropy)):
                    stats[key].append(v.item())
            C.sum_gradients(params)                              # torchrun: the global gradient
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            opt.step()
    return stats


def ppo_update(update, batch_prompts, models: PPOModels, tokenizer, opt, sched, gen, args, task,
               train_policy: bool = True) -> dict:
    """One PPO update (steps 1-6 of the module docstring) on one batch of prompts; its log row.

    The optimizer holds the policy's and the value model's parameters; `sched` decays its lr.
    `task` gives the response length, the prompt truncation and the gold reward.
    train_policy=False is a critic warm-up update: the same rollout, advantages and returns, but
    only the value loss is minimised (the policy gets no gradient) and the lr schedule does not
    advance.
    """
    t0 = time.time()
    B = len(batch_prompts)
    batch, log = rollout(update, batch_prompts, models, tokenizer, gen, args, task)   # 1-4
    stats = optimise(update, batch, B, models, opt, tokenizer, args, train_policy)             # 5
    lr = sched.get_last_lr()[0]
    if train_policy:
        sched.step()

    # 6. log: what PPO optimised (proxy) next to what we actually want (gold)
    seconds = time.time() - t0
    return {
        "update": update, "episodes": update * B,
        "kl_to_ref": log["kl_to_ref"].mean().item(),
        "kl_to_sft": log["kl_to_sft"].mean().item(),
        "proxy_reward": log["score"].mean().item(),
        # gold of the training batch when it is cheap (the embedded task); a gold RM scores
        # only at evaluations (null here)
        "gold_reward": (task.gold(batch_prompts, log["texts"], log["ended"]).mean().item()
                        if task.cheap_gold else None),
        "response_length": log["length"].mean().item(),
        "no_eos_fraction": 1.0 - sum(log["ended"]) / B,
        **{k: sum(v) / len(v) if v else None for k, v in stats.items()},   # None: warm-up
        "lr": lr, "episodes_per_second": B / seconds,
        # prompt + response tokens through the update, pads excluded
        "tokens_per_second": log["tokens"] / seconds,
    }


def main(argv=None):
    args = parse_args(argv)
    C.check_output(args.out)
    device = C.pick_device(args.device)
    C.set_seed(args.seed)
    start = time.time()

    # 0. models: policy (trained), KL reference and SFT (frozen), RM (frozen), value (trained)
    policy, tokenizer = C.load_policy(args.init, device)
    kl_ref, ref_tok = C.load_policy(args.kl_ref, device)
    sft, sft_tok = C.load_policy(args.sft, device)
    rm, rm_tok = C.load_reward_model(args.reward_model, device)
    for tok, name in ((ref_tok, args.kl_ref), (sft_tok, args.sft), (rm_tok, args.reward_model)):
        C.check_same_tokenizer(tokenizer, tok, args.init, name)
    value_model = C.apply_attention(AutoModelForSequenceClassification.from_pretrained(
        args.reward_model, use_safetensors=True, dtype=torch.float32)).to(device)
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable()
        value_model.activation_checkpointing_enable()
    task = T.load_task(args.sft, device)
    for m in (kl_ref, sft, rm):
        m.requires_grad_(False)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    params = list(policy.parameters()) + list(value_model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, eps=1e-5, fused=True)   # one kernel, not a loop
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0 - u / args.updates)

    B = args.batch_size
    prompts = task.ppo_prompts(args.updates * B, seed=args.seed)
    # torchrun: each rank samples its rows of every batch with a generator of its own
    C.check_batch_for_ranks(B)
    gen = torch.Generator(device=device).manual_seed(args.seed + C.RANK_SEED * C.rank_and_world()[0])
    held = C.held_out(task, tokenizer, args.eval_prompts, sft, rm, args.forward_batch_size,
                      args.no_eos_score, device)
    metrics, curve = [], []

    def eval_point(update):
        stats, *_ = C.evaluate(policy, held, args.temperature, "ppo", update)
        curve.append({"update": update, "episodes": update * B, **stats})

    eval_point(0)
    # the KL reference is the SFT policy (standard RLHF, round 1): KL to SFT is then the KL
    # penalty's own, no second forward, and one copy of the weights is enough
    same = C.same_weights(kl_ref, sft)
    if same:
        kl_ref = sft
    models = PPOModels(policy, value_model, kl_ref, rm, sft=None if same else sft)
    # critic warm-up (OpenRLHF's --freezing_actor_steps): the value model, a copy of the RM, has
    # only been fitted at EOS states; a few value-only updates fit it at every state before its
    # advantages move the policy. Its prompts are a stream of their own, so the policy's updates
    # see the same prompts with or without it.
    warmup_prompts = task.ppo_prompts(args.critic_warmup * B, seed=args.seed + WARMUP_SEED_OFFSET)
    warmup_value_loss = []
    for w in tqdm(range(args.critic_warmup), desc="critic warm-up", mininterval=2,
                  disable=not args.critic_warmup or not C.is_main()):
        row = ppo_update(w + 1, warmup_prompts[w * B:(w + 1) * B], models, tokenizer, opt, sched,
                         gen, args, task, train_policy=False)
        warmup_value_loss.append(row["value_loss"])
    bar = tqdm(range(1, args.updates + 1), desc="ppo", mininterval=2, disable=not C.is_main())
    for update in bar:
        row = ppo_update(update, prompts[(update - 1) * B:update * B], models, tokenizer, opt,
                         sched, gen, args, task)
        metrics.append(row)
        bar.set_postfix(proxy=f"{row['proxy_reward']:.2f}", kl=f"{row['kl_to_sft']:.2f}",
                        eps=f"{row['episodes_per_second']:.1f}",
                        tok_s=f"{row['tokens_per_second']:.0f}", refresh=False)
        if update % args.eval_every == 0 or update == args.updates:
            eval_point(update)
    policy.eval()
    # the updates' own throughput, evaluations left out: all their tokens over all their time
    seconds = [B / r["episodes_per_second"] for r in metrics]
    tokens = sum(r["tokens_per_second"] * t for r, t in zip(metrics, seconds))
    speed = C.throughput(device, round(tokens), sum(seconds))

    # 7. final evaluation: near-greedy decode; gold win rates against the SFT policy's near-greedy
    #    responses and against the dataset's reference responses (the paper's headline metric)
    final = C.final_evaluation(policy, held, curve[-1]["kl_to_sft"], "ppo")

    C.save_checkpoint(args.out, policy, tokenizer, {
        "metrics.jsonl": metrics, "eval.jsonl": curve, "final.json": final,
        "ppo_info.json": {"args": vars(args), "seconds": time.time() - start,
                          "critic_warmup_value_loss": warmup_value_loss, **speed}})
    print(f"ppo: final gold {final['gold']:.3f}, proxy {final['proxy']:.3f}, "
          f"win rate vs SFT {final['win_rate_vs_sft']:.3f}, vs reference "
          f"{final['win_rate_vs_reference']:.3f}, KL to SFT {final['kl_to_sft']:.2f}; "
          f"{C.throughput_text(speed)}; saved {args.out} ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    C.run_main(main)
