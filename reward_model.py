"""Stage 2: preference pairs from the SFT policy and a Bradley-Terry reward model
(docs/method.md section 3, steps 2-4; the weighted loss of section 2).

1. D <- for each prompt, two responses y0, y1 ~ pi_sft( . | x) at T = 1.0. We store their token
   ids, their text and l_sft(y) = sum_t log pi_sft(y_t | x, y_<t) (T = 1.0, EOS included, float32),
   which ocrm_correct.py later needs as the denominator of the density ratio.
   `--pair_temperature T` samples at T instead and stores l_sft at that same T: the
   log-density the pairs were really drawn from, so OCRM's weights stay exact importance
   weights towards pi_k at T = 1.0. Not the paper's setting (T = 1.0): a knob for how far the
   stored pairs reach (docs/experiments.md, "Levers measured since").
2. Label each pair with the gold reward: the higher gold score wins (`--label argmax`, the
   authors' choice; ties are broken by a fair coin) or a Bradley-Terry draw
   P(y1 > y0) = sigmoid(gold(y1) - gold(y0)) (`--label bt`).
3. RM <- SFT backbone + fresh scalar head, score read at the last real token (EOS), fitted with
       L(theta) = mean_i  w_i * -log sigmoid( r(x_i, y_c,i) - r(x_i, y_r,i) )
   where w_i = 1 unless the dataset has a `weight` column (written by ocrm_correct.py).
4. Centre: bias = mean RM score on held-out reference responses, stored in the checkpoint's
   config as `reward_bias` and subtracted whenever the RM is used, so rewards are centred.

In : --sft  (sft.py output)   --prefs (created here if missing; reused if present, and then
     --num_pairs, --label, --pair_temperature and --seed must be the ones it was made with)
Out: --prefs a `datasets` dataset (save_to_disk) with prompt, chosen, rejected, gold_*, logp_sft_*,
     prompt_ids, chosen_ids, rejected_ids
     --out   an AutoModelForSequenceClassification directory (+ tokenizer, rm_info.json)

    python reward_model.py --sft runs/toy-seed1/sft --prefs runs/toy-seed1/prefs --out runs/toy-seed1/rm_1

Departures: the authors label with a gold RM on TL;DR; on the embedded task gold is the task's
program (with sft.py --dataset it is the gold RM named there, as in the paper).
Held-out accuracy is measured on a fixed 10% of the pairs that is never trained on.
By default the SFT backbone is frozen and only the scalar head is fitted (--train_backbone 0), where
the authors fine-tune the whole RM: a linear head on fixed features is a misspecified RM whose best
fit depends on where the pairs lie, which is the situation OCRM addresses. On the embedded task a
whole (or last-block) RM learns the gold reward well enough that PPO does not overoptimize it
(docs/experiments.md); --train_last_blocks K trains the last K blocks, in between.
"""
import argparse
import json
import random
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification

import common as C
import task as T

PREF_COLUMNS = ("prompt", "chosen", "rejected", "gold_chosen", "gold_rejected",
                "logp_sft_chosen", "logp_sft_rejected", "prompt_ids", "chosen_ids", "rejected_ids")


def add_fit_args(p: argparse.ArgumentParser) -> None:
    """RM-fit flags, shared with ocrm_correct.py so a corrected RM is fitted exactly the same way."""
    p.add_argument("--seed", type=int, default=1, help="random seed (sampling, labels, init, order)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--epochs", type=int, default=4, help="passes over the training pairs")
    p.add_argument("--batch_size", type=int, default=64, help="pairs per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate, linear decay to 0 "
                   "(3e-3 suits the default linear head; use ~3e-4 with --train_backbone 1)")
    p.add_argument("--train_backbone", type=int, default=0,
                   help="1: fine-tune the SFT backbone with the head; 0: freeze it and fit only the "
                        "linear head (a deliberately misspecified RM)")
    p.add_argument("--weight_decay", type=float, default=0.01,
                   help="AdamW's decoupled weight decay (0.01, torch's default); larger shrinks the "
                        "weights of features that barely vary in the pairs")
    p.add_argument("--train_last_blocks", type=int, default=0,
                   help="with --train_backbone 0: also fit the last K transformer blocks and the "
                        "final norm (between a linear head on frozen features and the whole RM)")
    p.add_argument("--heldout_fraction", type=float, default=0.1,
                   help="fraction of pairs kept out of training for the accuracy check")
    p.add_argument("--micro_batch_size", type=int, default=0,
                   help="pairs per forward/backward; gradients accumulate over a batch "
                        "(0: the whole batch at once)")
    p.add_argument("--gradient_checkpointing", type=int, default=0,
                   help="1: recompute the backbone's activations in the backward pass")
    p.add_argument("--forward_batch_size", type=int, default=512,
                   help="sequences per no-grad forward (sampling, log-probs, accuracy)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sft", required=True, help="SFT checkpoint directory (sft.py --out)")
    p.add_argument("--prefs", required=True, help="preference dataset directory (made if missing)")
    p.add_argument("--out", required=True, help="output reward-model directory")
    p.add_argument("--num_pairs", type=int, default=10000, help="pairs to sample if --prefs is missing")
    p.add_argument("--label", choices=("argmax", "bt"), default="argmax",
                   help="gold label: higher score wins, or a Bradley-Terry draw")
    p.add_argument("--pair_temperature", type=float, default=1.0,
                   help="sampling temperature of the pairs; logp_sft_* is stored at the same "
                        "temperature, the density the pairs were drawn from (the paper: 1.0)")
    add_fit_args(p)
    args = p.parse_args(argv)
    if args.num_pairs <= 0 or args.epochs <= 0 or not args.pair_temperature > 0:
        raise C.StageError("--num_pairs, --epochs and --pair_temperature must be positive")
    check_fit_args(args)
    return args


def check_fit_args(args) -> None:
    if args.forward_batch_size <= 0 or args.batch_size <= 0:
        raise C.StageError("--batch_size and --forward_batch_size must be positive")
    if args.train_last_blocks < 0 or (args.train_last_blocks and args.train_backbone):
        raise C.StageError("--train_last_blocks K >= 0 goes with --train_backbone 0 (with "
                           "--train_backbone 1 every block is trained already)")
    if args.gradient_checkpointing and not args.train_backbone:
        raise C.StageError("--gradient_checkpointing 1 does nothing without --train_backbone 1 "
                           "(only the whole backbone's backward pass is recomputed)")
    if not 0.0 < args.heldout_fraction < 1.0:
        raise C.StageError(f"--heldout_fraction must be in (0, 1), got {args.heldout_fraction}: "
                           f"the held-out pairs are the RM's accuracy check (at least one pair "
                           f"is held out, so 0 would not turn it off)")
    C.check_micro_batch(args.micro_batch_size, args.batch_size, "--batch_size")


# ----------------------------------------------------------------------------------------------
# 1-2. Sample and label the pairs once
# ----------------------------------------------------------------------------------------------
PAIRS_SETTINGS = "pairs_settings.json"   # next to the dataset: the flags the pairs were made with


def pair_settings(num_pairs: int, label: str, seed: int, temperature: float) -> dict:
    """The flags the stored pairs were made with (checked on reuse; the number of torchrun
    processes, which sets the sampling order but not the pairs' distribution, is only recorded)."""
    return {"num_pairs": num_pairs, "label": label, "seed": seed, "pair_temperature": temperature}


def check_pairs_match(prefs, wanted: dict) -> None:
    """Reused pairs must have been made with the flags of this call: a silently ignored
    --num_pairs or --label would fit an RM on other pairs than the command line says."""
    file = Path(prefs) / PAIRS_SETTINGS
    if not file.is_file():          # a dataset made elsewhere: its settings are its own business
        return
    saved = json.loads(file.read_text())
    differ = [f"--{k} {saved.get(k)} (asked {v})" for k, v in wanted.items() if saved.get(k) != v]
    if differ:
        raise C.StageError(f"{prefs} holds pairs made with {', '.join(differ)}; pass the same "
                           f"flags, or delete it to sample new pairs")


def make_preferences(sft_dir, task, out, num_pairs: int, label: str, seed: int, device,
                     batch_size: int = 512, temperature: float = 1.0) -> None:
    policy, tokenizer = C.load_policy(sft_dir, device)
    data = sample_preferences(policy, tokenizer, task, num_pairs, label, seed, device, batch_size,
                              temperature=temperature)
    with C.atomic_output(out) as tmp:
        if C.is_main():                      # under torchrun, only rank 0 writes
            data.save_to_disk(str(tmp))
            C.write_json(tmp / PAIRS_SETTINGS, {**pair_settings(num_pairs, label, seed, temperature),
                                                "processes": C.rank_and_world()[1]})
    gold_c, gold_r = torch.tensor(data["gold_chosen"]), torch.tensor(data["gold_rejected"])
    print(f"prefs: {num_pairs} pairs saved to {out}; chosen has strictly higher gold in "
          f"{(gold_c > gold_r).float().mean():.1%} (ties {(gold_c == gold_r).float().mean():.1%})")


def sample_preferences(policy, tokenizer, task, num_pairs: int, label: str, seed: int, device,
                       batch_size: int = 512, stage: str = "reward_model",
                       temperature: float = 1.0) -> datasets.Dataset:
    """Two samples (at `temperature`) of `policy` for each of num_pairs prompts, labelled by the
    task's gold reward, with their log-probs under that policy at that temperature (logp_sft_*)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = task.pair_prompts(num_pairs, seed=seed)
    query = C.encode_prompts(tokenizer, prompts, task.max_prompt_len).to(device)   # (N, P)
    # under torchrun each rank samples and labels a contiguous shard of the prompts with a
    # generator of its own (so the pairs differ from a single-process run's, equally distributed)
    rows = C.shard(num_pairs, batch_size)
    gen = torch.Generator(device=device).manual_seed(seed + C.RANK_SEED * C.rank_and_world()[0])
    # an empty first piece: a rank may have no rows
    responses = [torch.zeros(0, 2, task.response_len, dtype=torch.long, device=device)]
    logps = [torch.zeros(0, 2, device=device)]
    for i in tqdm(range(rows.start, rows.stop, batch_size), desc="sample pairs", mininterval=2,
                  disable=not C.is_main()):
        q = query[i:min(i + batch_size, rows.stop)]
        pair = [C.sample(policy, q, pad, eos, task.response_len, temperature, gen, stage=stage)[0]
                for _ in range(2)]
        responses.append(torch.stack(pair, dim=1))                             # (b, 2, R)
        # l_sft through the same function ocrm_correct.py uses for l_k (same code path, float32)
        logps.append(torch.stack([C.sequence_logprobs(policy, q, r, pad, eos, temperature, batch_size)
                                  for r in pair], 1))
    responses, logps = torch.cat(responses), torch.cat(logps)                   # (n, 2, R), (n, 2)
    texts, ended = zip(*(C.decode_responses(tokenizer, responses[:, j], eos) for j in range(2)))
    gold = torch.stack([task.gold(prompts[rows], list(texts[j]), list(ended[j])) for j in range(2)],
                       dim=1) if texts[0] else torch.zeros(0, 2)                # (n, 2)
    # every rank's shard, in rank order                                           (N, 2, R), (N, 2)
    responses, logps, gold = C.gather_rows(responses), C.gather_rows(logps), C.gather_rows(gold)
    texts = tuple(C.gather_rows(list(texts[j])) for j in range(2))
    rng = random.Random(seed)
    if label == "argmax":   # higher gold wins; a tie carries no preference, so a coin decides
        first_wins = [g0 > g1 or (g0 == g1 and rng.random() < 0.5) for g0, g1 in gold.tolist()]
    else:                   # Bradley-Terry draw: P(y0 > y1) = sigmoid(g0 - g1)
        p0 = torch.sigmoid(gold[:, 0] - gold[:, 1]).tolist()
        first_wins = [rng.random() < p for p in p0]
    c = torch.tensor([0 if w else 1 for w in first_wins])                      # chosen index
    r = 1 - c
    rows = torch.arange(num_pairs)
    pick = lambda seq, j: [seq[int(j[i])][i] for i in range(num_pairs)]        # noqa: E731
    data = {
        "prompt": prompts,
        "chosen": pick(texts, c), "rejected": pick(texts, r),
        "gold_chosen": gold[rows, c].tolist(), "gold_rejected": gold[rows, r].tolist(),
        "logp_sft_chosen": logps[rows, c].tolist(), "logp_sft_rejected": logps[rows, r].tolist(),
        "prompt_ids": query.tolist(),
        "chosen_ids": responses[rows, c].tolist(), "rejected_ids": responses[rows, r].tolist(),
    }
    return datasets.Dataset.from_dict(data)


def load_preferences(path) -> datasets.Dataset:
    path = Path(path)
    if not path.is_dir():
        raise C.StageError(f"{path} does not exist; run reward_model.py first to make the pairs")
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:
        raise C.StageError(f"{path} is not a saved dataset: {str(e).splitlines()[0]}")
    missing = [col for col in PREF_COLUMNS if col not in data.column_names]
    if missing:
        raise C.StageError(f"{path} lacks the column(s) {missing}; remake it with reward_model.py")
    if len(data) < 2:
        raise C.StageError(f"{path} holds {len(data)} pairs; at least 2 are needed")
    return data


def split_indices(n: int, heldout_fraction: float, seed: int):
    """A fixed train/held-out split of the pair indices (the same for every RM of a run)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = max(1, int(n * heldout_fraction))
    return order[n_held:], order[:n_held]


# ----------------------------------------------------------------------------------------------
# 3-4. Weighted Bradley-Terry fit and centring
# ----------------------------------------------------------------------------------------------
def bt_loss(score_chosen, score_rejected, weight=None):
    """L = mean_i w_i * -log sigmoid(r_c,i - r_r,i); w = 1 gives the plain BT loss."""
    nll = -F.logsigmoid(score_chosen - score_rejected)                          # (B,)
    return nll.mean() if weight is None else (weight * nll).mean()


@torch.inference_mode()
def pair_accuracy(rm, query, chosen, rejected, pad, eos, batch_size=512) -> float:
    """Fraction of pairs the RM orders as labelled (under torchrun: each rank counts a shard)."""
    correct, rows = 0, C.shard(len(query), batch_size)
    for i in range(rows.start, rows.stop, batch_size):
        j = min(i + batch_size, rows.stop)
        score_c, score_r = C.pair_reward_scores(rm, query[i:j], chosen[i:j], rejected[i:j], pad, eos)
        margin = score_c - score_r
        correct += (margin > 0).sum().item()
    return C.all_sum(torch.tensor(correct)).item() / len(query)


def unfreeze_last_blocks(backbone, k: int) -> None:
    """Let the last k transformer blocks and everything after them (the final norm) train.

    The blocks are the backbone's one ModuleList (GPT-2's `h`, GPT-NeoX's and Llama's `layers`);
    what follows it among the backbone's children is the final norm."""
    children = list(backbone.children())
    at = next(i for i, m in enumerate(children) if isinstance(m, torch.nn.ModuleList))
    blocks = children[at]
    if k > len(blocks):
        raise C.StageError(f"--train_last_blocks {k}: the backbone has {len(blocks)} blocks")
    for module in list(blocks[-k:]) + children[at + 1:]:
        module.requires_grad_(True)


def fit_reward_model(sft_dir, task, data: datasets.Dataset, args, device, weight=None):
    """Fit RM = SFT backbone + fresh head on the pairs with per-pair weights; returns (rm, tok, info).
    `task` (the run's, from --sft) gives the held-out references the RM is centred on. The caller
    has loaded sft_dir with C.load_policy once already, which checks it is a whole policy."""
    C.set_seed(args.seed)
    tokenizer = C.load_tokenizer(sft_dir)
    rm = C.apply_attention(AutoModelForSequenceClassification.from_pretrained(
        sft_dir, num_labels=1, use_safetensors=True, dtype=torch.float32))
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.base_model.requires_grad_(bool(args.train_backbone))
    if args.train_last_blocks:
        unfreeze_last_blocks(rm.base_model, args.train_last_blocks)
    if args.gradient_checkpointing and args.train_backbone:
        rm.activation_checkpointing_enable()
    rm.to(device)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    query = torch.tensor(data["prompt_ids"], device=device)                   # (N, P)
    chosen = torch.tensor(data["chosen_ids"], device=device)                  # (N, R)
    rejected = torch.tensor(data["rejected_ids"], device=device)              # (N, R)
    weight = torch.ones(len(data)) if weight is None else torch.as_tensor(weight, dtype=torch.float32)
    weight = weight.to(device)
    C.check_finite(weight, "weight", "reward_model")
    train_idx, held_idx = split_indices(len(data), args.heldout_fraction, args.seed)

    trained = [p for p in rm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay,
                            fused=True)                                 # one kernel, not a loop
    micro = args.micro_batch_size or args.batch_size
    steps_per_epoch = max(1, len(train_idx) // args.batch_size)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total)
    rm.train()
    # real tokens per pair: the prompt (computed once for both responses) and the two responses
    pair_tokens = ((query != pad).sum(1) + C.response_mask(chosen, eos).sum(1)
                   + C.response_mask(rejected, eos).sum(1))                           # (N,)
    tokens, train_start = 0, time.time()
    # the bar is closed before any error line; under torchrun only rank 0 draws it
    with tqdm(total=total, desc="reward model", mininterval=2, disable=not C.is_main()) as bar:
        for epoch in range(args.epochs):
            order = train_idx[torch.randperm(len(train_idx))]
            for step in range(steps_per_epoch):
                idx = order[step * args.batch_size:(step + 1) * args.batch_size].to(device)
                tokens += pair_tokens[idx].sum().item()
                opt.zero_grad(set_to_none=True)
                loss = torch.zeros((), device=device)
                # gradient accumulation over micro-batches (of this rank's shard under torchrun)
                for mb in idx[C.shard(len(idx))].split(micro):
                    with C.autocast(device):   # each pair's prompt is computed once, for both
                        score_c, score_r = C.pair_reward_scores(rm, query[mb], chosen[mb],
                                                                rejected[mb], pad, eos)
                    # the batch's mean loss, as a sum of micro-batch means weighted by their size
                    mb_loss = bt_loss(score_c, score_r, weight[mb]) * (len(mb) / len(idx))
                    C.check_finite(mb_loss, "loss", "reward_model", epoch * steps_per_epoch + step + 1)
                    mb_loss.backward()
                    loss += mb_loss.detach()
                C.sum_gradients(trained)             # torchrun: the global batch's gradient
                loss = C.all_sum(loss)
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    rm.eval()
    speed = C.throughput(device, tokens, time.time() - train_start)

    # 4. centre on held-out reference responses: bias = mean_x r(x, y_ref)
    ref_prompts, references = task.centring_examples(1024, seed=args.seed)
    ref_query = C.encode_prompts(tokenizer, ref_prompts, task.max_prompt_len).to(device)
    ref_resp = C.encode_responses(tokenizer, references, task.response_len).to(device)
    with torch.inference_mode():
        bias = torch.cat([C.reward_scores(rm, q, r, pad, eos) for q, r in zip(
            ref_query.split(args.forward_batch_size), ref_resp.split(args.forward_batch_size))]
        ).mean().item()
    C.check_finite(bias, "centring bias", "reward_model")
    rm.config.reward_bias = bias

    held = held_idx.to(device)
    info = {
        "heldout_accuracy": pair_accuracy(rm, query[held], chosen[held], rejected[held], pad, eos,
                                          args.forward_batch_size),
        "train_accuracy": pair_accuracy(rm, query[train_idx], chosen[train_idx],
                                        rejected[train_idx], pad, eos, args.forward_batch_size),
        "final_loss": loss.item(), "reward_bias": bias, "num_pairs": len(data),
        "weighted": bool((weight != 1).any()), **speed,
    }
    return rm, tokenizer, info


def save_reward_model(rm, tokenizer, info: dict, out) -> None:
    C.save_checkpoint(out, rm, tokenizer, {"rm_info.json": info})


def main(argv=None):
    args = parse_args(argv)
    C.check_output(args.out)
    device = C.pick_device(args.device)
    C.check_batch_for_ranks(args.batch_size)        # torchrun: a share of each batch per rank
    start = time.time()
    C.load_policy(args.sft, "cpu")                                  # fail early with a clear message
    task = T.load_task(args.sft, device)                            # data and gold, from sft.py
    if Path(args.prefs).exists():
        check_pairs_match(args.prefs, pair_settings(args.num_pairs, args.label, args.seed,
                                                    args.pair_temperature))
    else:
        make_preferences(args.sft, task, args.prefs, args.num_pairs, args.label, args.seed, device,
                         args.forward_batch_size, args.pair_temperature)
    data = load_preferences(args.prefs)
    weight = data["weight"] if "weight" in data.column_names else None
    rm, tokenizer, info = fit_reward_model(args.sft, task, data, args, device, weight)
    info.update(args=vars(args), seconds=time.time() - start)
    save_reward_model(rm, tokenizer, info, args.out)
    print(f"reward model: held-out pair accuracy {info['heldout_accuracy']:.3f} "
          f"(train {info['train_accuracy']:.3f}), bias {info['reward_bias']:.3f}, "
          f"{C.throughput_text(info)}, saved {args.out} ({info['seconds']:.0f}s)")


if __name__ == "__main__":
    C.run_main(main)
