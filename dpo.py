"""Baselines: DPO and WPO on the run's stored pairs (the paper's offline comparisons).

Direct preference optimisation trains the policy on the same gold-labelled SFT pairs the reward
model was fitted on, with no reward model and no sampling during training:

  l(y)     = sum_t log pi(y_t | x, y_<t)            real response tokens, EOS included (T = 1)
  margin   = beta * [(l_pi(y_c) - l_ref(y_c)) - (l_pi(y_r) - l_ref(y_r))],   ref = pi_sft
  L_DPO    = mean_i  w_i * -log sigmoid(margin_i)                             (Rafailov et al.)
  implicit rewards  beta (l_pi(y) - l_ref(y)),  0 for both responses at the start (L = log 2)

WPO (--wpo 1) weights each pair by how likely the current policy is to produce it, like OCRM
re-weights the RM's pairs, but per token and inside the policy loss. As the authors' code computes
it, per response and without gradient:
  a(y)     = (1/|y|) sum_t [ log pi(y_t | ...) - log sum_v pi(v | ...)^2 ]
  w        = min(1, exp(a(y_c) + a(y_r)))
--wpo 0 gives w = 1 (plain DPO).

The sequence log-probs are common.response_logprob_sums, the function the density ratios use, so
only the tokens up to and including the first EOS count: prompt padding and post-EOS tokens never
enter a sum (the authors' label mask assumes an unpadded prompt; with left padding theirs lets
prompt and post-EOS tokens in). The reference log-probs come from the same function on the same
micro-batch, so at the start pi and ref give identical numbers and the loss is exactly log 2.

Evaluation is the PPO arms' own (common.evaluate / final_evaluation on the fixed held-out prompts,
proxy = the run's RM_1): eval.jsonl every --eval_every steps (`episodes` = pairs seen), final.json.

In : --sft (policy init and reference), --prefs (reward_model.py's pairs), --reward_model (RM_1,
     for the proxy column only)
Out: --out  the policy (Hugging Face directory), eval.jsonl, final.json, dpo_info.json

    python dpo.py --sft runs/toy-seed1/sft --prefs runs/toy-seed1/prefs \\
        --reward_model runs/toy-seed1/rm_1 --out runs/toy-seed1/dpo
    python dpo.py ... --wpo 1 --out runs/toy-seed1/wpo

Departures: the authors use lr 3e-6 with cosine decay on Pythia-1B and 92,832 pairs; the embedded
task's ~100k-parameter policy needs a larger lr (docs/experiments.md, "DPO and WPO": how it was
chosen). The pairs are the RM's training split (its held-out 10% give the held-out preference
accuracy of the implicit reward).
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common as C
import reward_model as RM
import task as T


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sft", required=True, help="SFT policy: the start and the reference")
    p.add_argument("--prefs", required=True, help="preference pairs (reward_model.py --prefs)")
    p.add_argument("--reward_model", required=True,
                   help="the run's RM_1: scores the evaluations' proxy column only")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--wpo", type=int, default=0, choices=(0, 1),
                   help="1: weight each pair by the WPO weight (on-policy-ness of the pair)")
    p.add_argument("--seed", type=int, default=1, help="random seed (order of the pairs)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--beta", type=float, default=0.05, help="DPO's beta (the authors': 0.05)")
    p.add_argument("--lr", type=float, default=3e-5, help="AdamW peak lr, cosine decay to 0")
    p.add_argument("--epochs", type=int, default=1, help="passes over the pairs")
    p.add_argument("--batch_size", type=int, default=64, help="pairs per optimizer step")
    p.add_argument("--micro_batch_size", type=int, default=0,
                   help="pairs per forward/backward; gradients accumulate (0: the whole batch)")
    p.add_argument("--heldout_fraction", type=float, default=0.1,
                   help="pairs kept out (the RM's held-out split, same seed)")
    p.add_argument("--eval_every", type=int, default=25, help="steps between held-out evaluations")
    p.add_argument("--eval_prompts", type=int, default=C.EVAL_PROMPTS, help="size of the held-out prompt set")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature of the evaluations' curve (the PPO arms')")
    p.add_argument("--no_eos_score", type=float, default=-1.0, help="RM score of a response with no EOS")
    p.add_argument("--forward_batch_size", type=int, default=512,
                   help="sequences per no-grad forward in evaluation")
    args = p.parse_args(argv)
    if min(args.beta, args.lr, args.epochs, args.batch_size, args.eval_every,
           args.eval_prompts, args.forward_batch_size) <= 0:
        raise C.StageError("--beta, --lr, --epochs, --batch_size, --eval_every, --eval_prompts "
                           "and --forward_batch_size must be positive")
    C.check_micro_batch(args.micro_batch_size, args.batch_size, "--batch_size")
    return args


# ----------------------------------------------------------------------------------------------
# The math
# ----------------------------------------------------------------------------------------------
def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta: float, weight=None):
    """L = mean_i w_i * -log sigmoid(beta [(l_c - ref_c) - (l_r - ref_r)]); also the implicit
    rewards beta (l - ref) of both responses."""
    reward_chosen = beta * (logp_chosen - ref_chosen)                                # (B,)
    reward_rejected = beta * (logp_rejected - ref_rejected)
    nll = -F.logsigmoid(reward_chosen - reward_rejected)
    loss = nll.mean() if weight is None else (weight * nll).mean()
    return loss, reward_chosen, reward_rejected


@torch.no_grad()
def wpo_weights(policy, query, chosen, rejected, pad, eos):
    """w = min(1, exp(a(y_c) + a(y_r))), a(y) = mean over real tokens of
    log pi(y_t) - log sum_v pi(v)^2, under the current policy at T = 1, no gradient: (B,)."""
    def a(response):
        logp = torch.log_softmax(C.response_logits(policy, query, response, pad, eos, 1.0), -1)
        token = logp.gather(-1, response.unsqueeze(-1)).squeeze(-1)                 # (B, R)
        log_sum_p2 = torch.logsumexp(2 * logp, dim=-1)                             # log sum p^2
        mask = C.response_mask(response, eos).float()
        return ((token - log_sum_p2) * mask).sum(1) / mask.sum(1)
    return torch.exp(a(chosen) + a(rejected)).clamp(max=1.0)


def main(argv=None):
    args = parse_args(argv)
    C.check_output(args.out)
    device = C.pick_device(args.device)
    C.check_batch_for_ranks(args.batch_size)        # torchrun: a share of each batch per rank
    C.set_seed(args.seed)
    start = time.time()
    stage = "wpo" if args.wpo else "dpo"

    # 0. models: the policy (trained) and the reference (frozen) both start as pi_sft
    policy, tokenizer = C.load_policy(args.sft, device)
    reference, _ = C.load_policy(args.sft, device)
    reference.requires_grad_(False)
    rm, rm_tok = C.load_reward_model(args.reward_model, device)
    C.check_same_tokenizer(tokenizer, rm_tok, args.sft, args.reward_model)
    task = T.load_task(args.sft, device)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    # 1. the stored pairs, the RM's own training split (its held-out pairs stay out)
    data = RM.load_preferences(args.prefs)
    query = torch.tensor(data["prompt_ids"], device=device)                      # (N, P)
    chosen = torch.tensor(data["chosen_ids"], device=device)                     # (N, R)
    rejected = torch.tensor(data["rejected_ids"], device=device)
    train_idx, held_idx = RM.split_indices(len(data), args.heldout_fraction, args.seed)
    steps_per_epoch = len(train_idx) // args.batch_size
    if steps_per_epoch == 0:
        raise C.StageError(f"{len(train_idx)} training pairs are fewer than --batch_size "
                           f"({args.batch_size})")
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5)
    # cosine decay to 0, as the authors' scheduler
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    micro = args.micro_batch_size or args.batch_size

    held = C.held_out(task, tokenizer, args.eval_prompts, reference, rm, args.forward_batch_size,
                      args.no_eos_score, device)
    curve, log = [], []

    def eval_point(step):
        policy.eval()
        stats, *_ = C.evaluate(policy, held, args.temperature, stage, step)
        curve.append({"update": step, "episodes": step * args.batch_size, **stats})
        policy.train()

    # 2. train
    eval_point(0)
    policy.train()
    step = 0
    with tqdm(total=total, desc=stage, mininterval=2, disable=not C.is_main()) as bar:
        for epoch in range(args.epochs):
            order = train_idx[torch.randperm(len(train_idx))]
            for k in range(steps_per_epoch):
                idx = order[k * args.batch_size:(k + 1) * args.batch_size].to(device)
                opt.zero_grad(set_to_none=True)
                row = {"loss": 0.0, "accuracy": 0.0, "weight": 0.0, "margin": 0.0}
                for mb in idx[C.shard(len(idx))].split(micro):   # torchrun: this rank's shard
                    q, c, r = query[mb], chosen[mb], rejected[mb]
                    weight = wpo_weights(policy, q, c, r, pad, eos) if args.wpo else None
                    with C.autocast(device):
                        with torch.no_grad():        # the same function, on the same inputs
                            ref_c = C.response_logprob_sums(reference, q, c, pad, eos)
                            ref_r = C.response_logprob_sums(reference, q, r, pad, eos)
                        logp_c = C.response_logprob_sums(policy, q, c, pad, eos)
                        logp_r = C.response_logprob_sums(policy, q, r, pad, eos)
                    loss, reward_c, reward_r = dpo_loss(logp_c, logp_r, ref_c, ref_r, args.beta,
                                                        weight)
                    C.check_finite(loss, "loss", stage, step + 1)
                    share = len(mb) / len(idx)       # the batch mean, micro-batch by micro-batch
                    (loss * share).backward()
                    row["loss"] += loss.item() * share
                    row["accuracy"] += (reward_c > reward_r).float().mean().item() * share
                    row["margin"] += (reward_c - reward_r).mean().item() * share
                    row["weight"] += (1.0 if weight is None else weight.mean().item()) * share
                C.sum_gradients(policy.parameters())       # torchrun: the global gradient
                row = dict(zip(row, C.all_sum(torch.tensor(list(row.values()),
                                                          dtype=torch.float64)).tolist()))
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                log.append({"step": step, **row, "lr": sched.get_last_lr()[0]})
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
                if step % args.eval_every == 0 or step == total:
                    eval_point(step)
    policy.eval()

    # 3. final evaluation, as every PPO stage's; implicit-reward accuracy on the held-out pairs
    final = C.final_evaluation(policy, held, curve[-1]["kl_to_sft"], stage)
    held_pairs = held_idx.to(device)
    with torch.inference_mode():
        margin = []
        for i in range(0, len(held_pairs), args.forward_batch_size):
            h = held_pairs[i:i + args.forward_batch_size]
            lp = [C.response_logprob_sums(m, query[h], y[h], pad, eos)
                  for m in (policy, reference) for y in (chosen, rejected)]
            margin.append((lp[0] - lp[2]) - (lp[1] - lp[3]))
    final["heldout_preference_accuracy"] = (torch.cat(margin) > 0).float().mean().item()

    C.save_checkpoint(args.out, policy, tokenizer, {
        "metrics.jsonl": log, "eval.jsonl": curve, "final.json": final,
        "dpo_info.json": {"args": vars(args), "seconds": time.time() - start}})
    print(f"{stage}: final gold {final['gold']:.3f}, win rate vs SFT {final['win_rate_vs_sft']:.3f}, "
          f"vs reference {final['win_rate_vs_reference']:.3f}, KL to SFT {final['kl_to_sft']:.2f}, "
          f"held-out preference accuracy {final['heldout_preference_accuracy']:.3f}; saved "
          f"{args.out} ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    C.run_main(main)
