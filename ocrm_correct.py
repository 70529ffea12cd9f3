"""Stage 4: off-policy correction of the reward model (docs/method.md section 2, section 3 step 6).

The RM was fitted on pairs drawn from pi_sft, but PPO now uses it on responses from pi_k.
Re-weight every stored pair by how much more likely it is under pi_k and refit:

  l_k(y)   = sum_t log pi_k(y_t | x, y_<t)        (T = 1.0, EOS included, float32)
  log r_a  = l_k - log( a exp(l_k) + (1 - a) exp(l_sft) )          relative ratio, <= log(1/a)
           = l_k - logaddexp( log a + l_k, log(1 - a) + l_sft )    (computed like this: exact)
  w        = exp( lam * (log r_a(y_c) + log r_a(y_r)) )             tempered product over BOTH
  optional: w <- w / mean(w)   (--normalize 1),   w <- min(w, clip) (--clip)
  RM_k     = argmin  mean_i w_i * -log sigmoid(r(x_i, y_c,i) - r(x_i, y_r,i))

RM_k starts again from the SFT backbone with a fresh head (not from RM_{k-1}) and is fitted by
reward_model.py's own fit, so the only difference from RM_1 is the weights.

In : --policy (pi_k, from ppo.py), --sft, --prefs (from reward_model.py)
Out: --weights_out  the prefs columns + logp_policy_chosen/rejected + weight (save_to_disk),
                    with settings.json (alpha, lam, normalize, clip) and the diagnostics;
                    if it already exists (an interrupted earlier call), it is reused when it was
                    made from the same --policy with the same settings, and is an error otherwise
     --out          the corrected RM (same format as reward_model.py's)

    python ocrm_correct.py --policy runs/toy-seed1/ocrm/round_1 --sft runs/toy-seed1/sft \\
        --prefs runs/toy-seed1/prefs --weights_out runs/toy-seed1/ocrm/weights_2 \\
        --out runs/toy-seed1/ocrm/rm_2 --lam 0.1

Two controls, not part of OCRM, that buy new labels instead of weighting (weights all 1;
settings.json records N):
  `--fresh_pairs N` alone fits RM_k on N new pairs sampled from pi_k and labelled by the gold
  reward: the on-policy refit the weights try to imitate without new labels (run_all.sh: the
  arm fresh_pairs);
  `--fresh_pairs N --prefs P` fits RM_k on the stored pairs P plus those N new ones, unweighted,
  as iterated online RLHF adds each round's new comparisons to the old ones (the arm
  fresh_plus_stored).

Departures: the authors' code adds 1e-36 inside the log in float32, which underflows once both
log-probs fall below about -87 and then returns a wrong ratio; here the ratio is computed with
logaddexp, exactly, for any log-prob. The embedded task's responses are short (summed log-probs
of a few tokens instead of 53), so its lam is larger than the authors' 0.001; how it was
chosen, with the policy-pair diagnostic below (RM accuracy vs gold on fresh pairs of the policy
being corrected), is in docs/experiments.md.
"""
import argparse
import json
import math
import time
from pathlib import Path

import datasets
import torch

import common as C
import task as T
import reward_model as RM


DIAG_PROMPTS = 1024   # held-out prompts of the policy-pair diagnostic when --diag_prompts is unset


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policy", required=True, help="current policy pi_k (ppo.py --out)")
    p.add_argument("--sft", required=True, help="SFT policy (denominator and RM init)")
    p.add_argument("--prefs", default=None,
                   help="the stored preference pairs to re-weight (reward_model.py --prefs); with "
                        "--fresh_pairs, the pairs the new ones are added to")
    p.add_argument("--weights_out", required=True, help="where to save the weighted dataset")
    p.add_argument("--out", required=True, help="output directory of the corrected RM")
    p.add_argument("--alpha", type=float, default=0.1, help="relative density ratio mix, in [0, 1)")
    p.add_argument("--lam", type=float, default=0.6,
                   help="tempering exponent on the ratio, >= 0 (w = r ** lam; 0 gives plain BT)")
    p.add_argument("--min_ess", type=float, default=0.0,
                   help="a floor on the weights' ESS as a fraction of N, in [0, 1): when the "
                        "weights at --lam fall below it, lam is lowered to the largest value in "
                        "[0, --lam] that keeps the ESS at the floor (not the authors'; 0: off)")
    p.add_argument("--normalize", type=int, default=0, help="1: rescale weights to mean 1")
    p.add_argument("--clip", type=float, default=0.0, help="cap on each weight (0: no cap)")
    p.add_argument("--fresh_pairs", type=int, default=0,
                   help="a control, not OCRM: instead of re-weighting the stored pairs, sample "
                        "this many new pairs from pi_k, label them with the gold reward (--label) "
                        "and fit on them unweighted: the on-policy refit any weighting "
                        "approximates, at the price of new labels; with --prefs, fit on the "
                        "stored pairs plus the new ones (0: off)")
    p.add_argument("--label", choices=("argmax", "bt"), default=None,
                   help="label rule for --fresh_pairs (unset: argmax): use the one the stored "
                        "pairs were made with (reward_model.py --label)")
    p.add_argument("--reward_model_before", default=None,
                   help="the RM the policy was trained against (RM_{k-1}); if given, its pairwise "
                        "accuracy on fresh policy samples is reported next to the corrected RM's")
    p.add_argument("--diag_prompts", type=int, default=None,
                   help="held-out prompts for that diagnostic, two samples each at T = 1.0 "
                        f"(unset: {DIAG_PROMPTS}; only with --reward_model_before)")
    RM.add_fit_args(p)
    args = p.parse_args(argv)
    RM.check_fit_args(args)
    if not 0.0 <= args.alpha < 1.0:
        raise C.StageError(f"--alpha must be in [0, 1), got {args.alpha}")
    if args.lam < 0 or args.clip < 0:
        raise C.StageError("--lam and --clip must be >= 0")
    if not 0.0 <= args.min_ess < 1.0:
        raise C.StageError(f"--min_ess must be in [0, 1), got {args.min_ess}")
    if args.fresh_pairs < 0 or args.fresh_pairs == 1:
        raise C.StageError(f"--fresh_pairs must be 0 (off) or at least 2, got {args.fresh_pairs}")
    if args.label is not None and not args.fresh_pairs:
        raise C.StageError("--label labels the new pairs of --fresh_pairs; the weighted refit "
                           "keeps the stored pairs' labels")
    weight_flags = [f"--{k}" for k in ("alpha", "lam", "min_ess", "normalize", "clip")
                    if getattr(args, k) != p.get_default(k)]
    shaping = [f for f in weight_flags if f in ("--alpha", "--min_ess", "--normalize")]
    if args.lam == 0 and shaping:
        raise C.StageError(f"{', '.join(shaping)} shape the weights, but --lam 0 makes every "
                           f"weight 1 (plain BT)")
    if args.fresh_pairs and weight_flags:
        raise C.StageError(f"{', '.join(weight_flags)} shape the weights of the stored pairs; "
                           f"--fresh_pairs fits on new pairs without weights")
    if not args.fresh_pairs and not args.prefs:
        raise C.StageError("--prefs: the stored pairs to re-weight are required")
    if args.diag_prompts is None:
        args.diag_prompts = DIAG_PROMPTS
    elif not args.reward_model_before:
        raise C.StageError("--diag_prompts sizes the diagnostic of --reward_model_before; "
                           "without it there is no diagnostic")
    elif args.diag_prompts < 1:
        raise C.StageError(f"--diag_prompts must be positive, got {args.diag_prompts}")
    args.label = args.label or "argmax"
    return args


# ----------------------------------------------------------------------------------------------
# The weights
# ----------------------------------------------------------------------------------------------
def log_relative_ratio(logp_policy, logp_sft, alpha: float):
    """log r_a = l_k - log(a e^l_k + (1 - a) e^l_sft), in log space (exact for any magnitude)."""
    if alpha == 0.0:
        return logp_policy - logp_sft                                    # plain ratio p_k / p_sft
    return logp_policy - torch.logaddexp(math.log(alpha) + logp_policy,
                                         math.log(1.0 - alpha) + logp_sft)


def pair_log_ratio(logp_policy_chosen, logp_policy_rejected, logp_sft_chosen, logp_sft_rejected,
                   alpha: float):
    """log r_a(y_c) + log r_a(y_r) of every pair, in float64 (a float32 exp of lam times it
    underflows to 0, and its log to -inf, for large lam)."""
    lpc, lpr, lsc, lsr = (torch.as_tensor(x, dtype=torch.float64) for x in
                          (logp_policy_chosen, logp_policy_rejected, logp_sft_chosen,
                           logp_sft_rejected))
    return log_relative_ratio(lpc, lsc, alpha) + log_relative_ratio(lpr, lsr, alpha)


def pair_weights(logp_policy_chosen, logp_policy_rejected, logp_sft_chosen, logp_sft_rejected,
                 alpha: float, lam: float, normalize: bool = False, clip: float = 0.0):
    """w = (r_a(y_c) r_a(y_r)) ** lam, optionally normalised to mean 1 and capped at `clip`."""
    log_w = lam * pair_log_ratio(logp_policy_chosen, logp_policy_rejected, logp_sft_chosen,
                                 logp_sft_rejected, alpha)
    if normalize:                              # w / mean(w), in log space: log w - logmeanexp
        log_w = log_w - (torch.logsumexp(log_w, dim=0) - math.log(len(log_w)))
    w = torch.exp(log_w)
    return w.clamp(max=clip) if clip > 0 else w


def lam_for_min_ess(logp_policy_chosen, logp_policy_rejected, logp_sft_chosen, logp_sft_rejected,
                    alpha: float, lam: float, min_ess: float) -> float:
    """The largest temper in [0, lam] whose weights keep ESS >= min_ess (before any clip).

    With s_i = log r_a(y_c,i) + log r_a(y_r,i) the weights are exp(t s_i), and ESS(t) never rises
    with t: d log ESS / dt = 2 (E_t[s] - E_2t[s]), where E_t is the mean under weights
    proportional to exp(t s), and that tilted mean grows with t (its derivative is a variance).
    So bisection on t finds the answer; ESS(0) = 1 >= any floor below 1.
    """
    s = pair_log_ratio(logp_policy_chosen, logp_policy_rejected, logp_sft_chosen,
                       logp_sft_rejected, alpha)

    def ess(t):                                 # shifted by the max: exp never overflows
        return effective_sample_size(torch.exp(t * s - (t * s).max()))

    if min_ess <= 0 or ess(lam) >= min_ess:
        return lam
    low, high = 0.0, lam                        # ess(low) >= min_ess > ess(high)
    for _ in range(60):                         # 2^-60 of lam: far below any printed digit
        mid = (low + high) / 2
        low, high = (mid, high) if ess(mid) >= min_ess else (low, mid)
    return low


def effective_sample_size(w) -> float:
    """ESS = (sum w)^2 / sum w^2, as a fraction of N (1 = uniform weights)."""
    w = torch.as_tensor(w, dtype=torch.float64)
    return (w.sum() ** 2 / (w ** 2).sum() / len(w)).item()


def weight_diagnostics(w) -> dict:
    w = torch.as_tensor(w, dtype=torch.float64)
    # log10 of the weights, with a zero weight (underflow) shown at the smallest positive float
    counts, edges = torch.histogram(w.clamp(min=torch.finfo(torch.float64).tiny).log10(), bins=10)
    return {"ess_fraction": effective_sample_size(w), "min": w.min().item(),
            "mean": w.mean().item(), "max": w.max().item(),
            "histogram_log10": {"edges": edges.tolist(), "counts": counts.long().tolist()}}


@torch.inference_mode()
def policy_pair_accuracy(rms: dict, policy, tokenizer, task, num_prompts: int, seed: int, device,
                         batch_size: int = 512) -> dict:
    """How well each RM ranks what the policy now produces: the error the correction targets.

    Two fresh responses per held-out prompt from pi_k (T = 1.0), labelled by the gold reward;
    accuracy = fraction of pairs with unequal gold where the RM orders them the same way
    (a response without EOS scores -1, as in PPO).
    """
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts, _ = task.eval_examples(num_prompts)
    query = C.encode_prompts(tokenizer, prompts, task.max_prompt_len).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    pair = [torch.cat([C.sample(policy, q, pad, eos, task.response_len, 1.0, gen, "ocrm_correct")[0]
                       for q in query.split(batch_size)]) for _ in range(2)]
    gold = [task.gold(prompts, *C.decode_responses(tokenizer, r, eos)) for r in pair]
    untied = gold[0] != gold[1]
    out = {"num_untied_pairs": int(untied.sum())}
    for name, rm in rms.items():
        score = [torch.cat([C.score_responses(rm, q, r, pad, eos).cpu()
                            for q, r in zip(query.split(batch_size), resp.split(batch_size))])
                 for resp in pair]
        agree = (score[0] > score[1]) == (gold[0] > gold[1])
        out[name] = agree[untied].float().mean().item()
    return out


def check_reusable(weights_dir: Path, settings: dict) -> None:
    """Weights left by an interrupted call are reused only if made from the same policy and stored
    pairs, the same way."""
    file = weights_dir / "settings.json"
    saved = json.loads(file.read_text()) if file.is_file() else {}
    paths = ("policy", "prefs")                 # the same directory however it is spelled
    differ = [k for k, v in settings.items() if k not in paths and saved.get(k) != v]
    for k in paths:
        here, there = settings[k], saved.get(k, "missing")
        if (here is None) != (there is None) or (
                here is not None and Path(there).resolve() != Path(here).resolve()):
            differ.append(k)
    if differ:
        raise C.StageError(f"{weights_dir} holds weights made with another "
                           f"{', '.join(f'{k} ({saved.get(k)})' for k in differ)}; delete it to "
                           f"recompute them")


def stored_logprobs(policy, tokenizer, data, args, device) -> dict:
    """l_k of both stored responses under the current policy, at T = 1.0 with the code that
    computed l_sft: {"chosen", "rejected"}: (N,)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    query = torch.tensor(data["prompt_ids"], device=device)
    rows = C.shard(len(query), args.forward_batch_size)    # torchrun: each rank scores a shard
    return {name: C.gather_rows(C.sequence_logprobs(
                policy, query[rows], torch.tensor(data[f"{name}_ids"], device=device)[rows],
                pad, eos, 1.0, args.forward_batch_size).cpu())
            for name in ("chosen", "rejected")}


def stored_pair_weights(policy, tokenizer, data, args, device):
    """a. l_k of both stored responses (stored_logprobs); b. the pairs' weights.
    Returns ({"chosen", "rejected"}: l_k, w, the lam used)."""
    logp = stored_logprobs(policy, tokenizer, data, args, device)
    columns = (logp["chosen"], logp["rejected"], torch.tensor(data["logp_sft_chosen"]),
               torch.tensor(data["logp_sft_rejected"]))
    lam = lam_for_min_ess(*columns, args.alpha, args.lam, args.min_ess)
    w = pair_weights(*columns, args.alpha, lam, bool(args.normalize), args.clip)
    C.check_finite(w, "weight", "ocrm_correct")
    return logp, w, lam


# ----------------------------------------------------------------------------------------------
# The controls (--fresh_pairs N): what the weights imitate, at the price of new labels
# ----------------------------------------------------------------------------------------------
def fresh_pairs_control(policy, tokenizer, task, args, device, stored=None):
    """N new pairs sampled from pi_k and labelled by the gold reward (their logp_sft_* columns
    hold log-probs under pi_k, the policy they were sampled from), after the `stored` pairs if
    given (their l_k computed as OCRM's step a does). Returns (the pairs, l_k of each, w = 1)."""
    data = RM.sample_preferences(policy, tokenizer, task, args.fresh_pairs, args.label, args.seed,
                                 device, args.forward_batch_size, "ocrm_correct")
    logp = {name: torch.tensor(data[f"logp_sft_{name}"]) for name in ("chosen", "rejected")}
    if stored is not None:                 # the stored pairs first, then the new ones
        logp_stored = stored_logprobs(policy, tokenizer, stored, args, device)
        logp = {name: torch.cat([logp_stored[name], logp[name]]) for name in logp}
        columns = {name: list(stored[name]) + list(data[name]) for name in RM.PREF_COLUMNS}
        # the two sets' prompts left-padded to one width, as every prompt is encoded
        columns["prompt_ids"] = C.encode_prompts(tokenizer, columns["prompt"],
                                                 task.max_prompt_len).tolist()
        data = datasets.Dataset.from_dict(columns)
    return data, logp, torch.ones(len(data), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    C.check_output(args.out)
    device = C.pick_device(args.device)
    C.check_batch_for_ranks(args.batch_size)        # torchrun: a share of each batch per rank
    start = time.time()
    data = RM.load_preferences(args.prefs) if args.prefs else None
    policy, tokenizer = C.load_policy(args.policy, device, what_to_run="ppo.py")
    _, sft_tok = C.load_policy(args.sft, "cpu")
    C.check_same_tokenizer(tokenizer, sft_tok, args.policy, args.sft)
    weights_dir = Path(args.weights_out)
    settings = {"alpha": args.alpha, "lam": args.lam, "min_ess": args.min_ess,
                "normalize": bool(args.normalize), "clip": args.clip,
                "fresh_pairs": args.fresh_pairs, "policy": str(args.policy),
                "prefs": str(args.prefs) if args.prefs else None}
    if args.fresh_pairs:   # what the new pairs depend on (the batch size and the number of
        #                    torchrun processes set the sampling order)
        settings.update(label=args.label, seed=args.seed,
                        forward_batch_size=args.forward_batch_size,
                        processes=C.rank_and_world()[1])
    task = T.load_task(args.sft, device)

    if weights_dir.exists():   # finished in an earlier, interrupted call: reuse, never recompute
        check_reusable(weights_dir, settings)
        data = datasets.load_from_disk(str(weights_dir))
        print(f"ocrm: reusing the weights in {weights_dir}")
    else:
        if args.fresh_pairs:   # a control with new labels, not the paper's method
            data, logp, w = fresh_pairs_control(policy, tokenizer, task, args, device, data)
            lam = None
        else:                  # a-b: the paper's step
            logp, w, lam = stored_pair_weights(policy, tokenizer, data, args, device)
        for col in ("logp_policy_chosen", "logp_policy_rejected", "weight"):
            if col in data.column_names:
                data = data.remove_columns(col)
        data = (data.add_column("logp_policy_chosen", logp["chosen"].tolist())
                    .add_column("logp_policy_rejected", logp["rejected"].tolist())
                    .add_column("weight", w.tolist()))
        settings["diagnostics"] = dict(weight_diagnostics(w), lam_used=lam)
        with C.atomic_output(weights_dir) as tmp:
            if C.is_main():                      # under torchrun, only rank 0 writes
                data.save_to_disk(str(tmp))
                C.write_json(tmp / "settings.json", settings)
    diag = json.loads((weights_dir / "settings.json").read_text())["diagnostics"]
    if diag["lam_used"] is not None and diag["lam_used"] != args.lam:
        print(f"ocrm: lam lowered from {args.lam} to {diag['lam_used']:.4f} to keep the ESS at "
              f"--min_ess {args.min_ess}")
    print(f"ocrm: weights ESS {diag['ess_fraction']:.1%} of N, min {diag['min']:.3g}, "
          f"mean {diag['mean']:.3g}, max {diag['max']:.3g}; log10 histogram "
          f"{diag['histogram_log10']['counts']}")

    # c. refit from the SFT backbone with the weighted BT loss (reward_model.py's fit)
    rm, tok, info = RM.fit_reward_model(args.sft, task, data, args, device, weight=data["weight"])
    # d. diagnostic: does the corrected RM rank the current policy's samples better?
    if args.reward_model_before:
        rm_before, tok_before = C.load_reward_model(args.reward_model_before, device)
        C.check_same_tokenizer(tok, tok_before, args.out, args.reward_model_before)
        acc = policy_pair_accuracy({"before": rm_before, "after": rm}, policy, tokenizer, task,
                                   args.diag_prompts, args.seed, device, args.forward_batch_size)
        info["policy_pair_accuracy"] = acc
        print(f"ocrm: pairwise accuracy vs gold on {acc['num_untied_pairs']} fresh policy pairs: "
              f"{acc['before']:.3f} before the correction, {acc['after']:.3f} after")
    info.update(args=vars(args), weights=diag, seconds=time.time() - start)
    RM.save_reward_model(rm, tok, info, args.out)
    print(f"ocrm: corrected RM held-out pair accuracy {info['heldout_accuracy']:.3f}, "
          f"{C.throughput_text(info)}, saved {args.out} ({info['seconds']:.0f}s)")


if __name__ == "__main__":
    C.run_main(main)
