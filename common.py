"""Shared plumbing for every stage: sequence layout, sampling, sequence log-probs, reward-model
scoring, checkpoint I/O, seeding and devices. The tasks (the embedded one, and a dataset with a
gold reward model) live in task.py.

Nothing in here is OCRM-specific math; each stage's algorithm lives in its own file
(sft.py, reward_model.py, ppo.py, ocrm_correct.py). What is here is written once because
several stages need exactly the same thing, and "exactly the same" matters: the paper's
density ratio compares log-probs computed by the same code path (docs/method.md, "Pitfalls").

Sequence layout used everywhere
-------------------------------
A (prompt, response) pair is two tensors:
  query    (B, P)  prompt token ids, LEFT-padded with pad_id to a common length P
  response (B, R)  response token ids, R = max new tokens; every token after the first EOS is pad
The "real" response tokens are those up to and including the first EOS (`response_mask`).
A response without EOS is truncated: all R tokens are real and it has no EOS.
The attention mask is built from that structure (not from token ids), so a pad id sampled in
the middle of a response could never be confused with padding.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `datasets` is imported only by the modules that read or write datasets (its import is a large
# share of a stage's start-up); its progress bars are off wherever it is imported later
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


# ----------------------------------------------------------------------------------------------
# Errors: one line, non-zero exit, no traceback for problems the user can fix.
# ----------------------------------------------------------------------------------------------
class StageError(Exception):
    """A problem with the user's input or the run directory, reported as one line."""


def run_main(main):
    """Run a stage's main(); turn a StageError into `error: ...` on stderr and exit code 2."""
    try:
        main()
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    import torch.distributed as dist
    if dist.is_initialized():                  # under torchrun: leave the process group cleanly
        dist.destroy_process_group()


def check_finite(value: float | torch.Tensor, what: str, stage: str, step: int | None = None) -> None:
    """Stop the stage if a loss, reward or weight is NaN or inf (nothing non-finite is saved)."""
    t = torch.as_tensor(value)
    if not torch.isfinite(t).all():
        at = "" if step is None else f" at update {step}"
        raise StageError(f"{stage}: non-finite {what}{at}; lower the learning rate or check the "
                         f"inputs")


# ----------------------------------------------------------------------------------------------
# Seeding and devices
# ----------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """`auto` -> cuda if present else cpu; asking for cuda without one is an error.
    Under torchrun (WORLD_SIZE > 1) this also joins the process group, and the device is
    cuda:LOCAL_RANK (one GPU per rank), whatever cuda index was asked for: see "Past one GPU"
    below and docs/gpu.md."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StageError("--device cuda was asked for but this machine has no CUDA; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StageError(f"unknown --device {name!r}; use auto, cpu or cuda") from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = init_distributed(device)
    return device


# ----------------------------------------------------------------------------------------------
# Past one GPU: `torchrun --nproc_per_node N STAGE.py ...` runs N copies of a stage (ranks).
# Every rank builds the same data and models from the same seed; the work that scales with the
# data is split between them and combined with a few collectives:
#   - a training step: each rank back-propagates its shard of the global batch, with the loss
#     normalised by the GLOBAL batch, and the gradients are summed over ranks (`sum_gradients`)
#     before the optimizer step, so every rank takes the single-process step;
#   - sampling and scoring: each rank does a contiguous shard of the rows (`shard`) and the
#     results are concatenated in rank order (`gather_rows`): the single-process order;
#   - only rank 0 writes (`atomic_output`).
# With one process (plain `python STAGE.py`) every helper below is the identity and no
# torch.distributed call is made.
# ----------------------------------------------------------------------------------------------
def init_distributed(device: torch.device) -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); this rank's device."""
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() > 0:                    # rank 0 prints; the others' lines would repeat it
        sys.stdout = open(os.devnull, "w")     # (errors still reach stderr)
    return device


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    return rank_and_world()[0] == 0


def shard(n: int, chunk: int = 1) -> slice:
    """This rank's contiguous share of n rows, cut at multiples of `chunk`. With chunk = the
    forward batch size, every rank's forward batches are the single-process ones (so scores
    come out bit-identical); a rank may get no rows."""
    rank, world = rank_and_world()
    chunks = -(-n // chunk)
    return slice(min(n, chunks * rank // world * chunk), min(n, chunks * (rank + 1) // world * chunk))


def gather_rows(x):
    """Every rank's rows concatenated in rank order (a tensor along dim 0, or a list)."""
    rank, world = rank_and_world()
    if world == 1:
        return x
    import torch.distributed as dist
    parts = [None] * world
    dist.all_gather_object(parts, x.cpu() if torch.is_tensor(x) else x)
    return torch.cat(parts).to(x.device) if torch.is_tensor(x) else sum(parts, [])


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over ranks (x itself with one process)."""
    if rank_and_world()[1] > 1:
        import torch.distributed as dist
        # NCCL reduces CUDA tensors only, gloo (CPU) CPU tensors: a copy on the group's device
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        y = x.detach().to(on, copy=True)
        dist.all_reduce(y)
        x = y.to(x.device)
    return x


def sum_gradients(params) -> None:
    """Sum each parameter's gradient over ranks (what DistributedDataParallel does, without
    wrapping the model, so the single-process code reads the same). Call after the last
    backward of a step, before clipping and the optimizer step."""
    if rank_and_world()[1] == 1:
        return
    import torch.distributed as dist
    params = [p for p in params if p.requires_grad]
    # a gradient is None where this rank's rows never reached the parameter: zeros then, unless
    # no rank has one (the policy in PPO's critic warm-up), where it stays None as with one process
    # (AdamW skips such a parameter; a zero gradient would still decay and step it)
    has_grad = all_sum(torch.tensor([p.grad is not None for p in params], dtype=torch.float32))
    for p, anyone in zip(params, has_grad.tolist()):
        if anyone:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when two loaded models hold the same parameters, wherever they were loaded from."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


RANK_SEED = 1_000_003   # rank r samples (pairs, rollouts) with a generator seeded seed + r * this


def check_batch_for_ranks(batch_size: int, flag: str = "--batch_size") -> None:
    """Every torchrun rank needs at least one row of each batch."""
    world = rank_and_world()[1]
    if batch_size < world:
        raise StageError(f"{flag} {batch_size} is smaller than the {world} torchrun processes")


def barrier() -> None:
    if rank_and_world()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


# Mixed precision: the models' weights are always fp32 (master weights; every loader below asks
# for float32, whatever dtype a hub checkpoint was saved in), and forward/backward passes run
# under bf16 autocast on CUDA. The tests add "cpu" here to run the mixed-precision code paths on
# a CPU (torch has bf16 autocast there too).
AUTOCAST = {"cuda": torch.bfloat16}


def autocast(device: torch.device):
    """bf16 autocast where AUTOCAST says so (CUDA); a no-op elsewhere (fp32)."""
    dtype = AUTOCAST.get(device.type)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def mixed_precision(device: torch.device) -> bool:
    return device.type in AUTOCAST


# ----------------------------------------------------------------------------------------------
# Tensors for (prompt, response) pairs
# ----------------------------------------------------------------------------------------------
def encode_prompts(tokenizer, prompts: list[str], max_len: int | None = None) -> torch.Tensor:
    """Left-padded prompt ids (B, P); a prompt longer than max_len keeps its LAST max_len tokens
    (the end of a prompt, e.g. TL;DR's closing "TL;DR:", is what the response continues)."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if max_len is not None:
        ids = [x[-max_len:] for x in ids]
    width = max(len(x) for x in ids)
    return torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids])


def encode_responses(tokenizer, responses: list[str], length: int) -> torch.Tensor:
    """Response ids (B, R): the words, then <eos>, then pad. Truncated to R tokens.
    A reference that already ends in the EOS text (TL;DR's end in "<|endoftext|>") gets one EOS."""
    rows = []
    for r in responses:
        if tokenizer.eos_token and r.endswith(tokenizer.eos_token):
            r = r[:-len(tokenizer.eos_token)]
        ids = tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = ids[:length]
        rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
    return torch.tensor(rows)


def response_mask(response: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, R) bool: True for tokens up to and including the first EOS (all True if no EOS)."""
    is_eos = (response == eos_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos     # number of EOS strictly before t
    return eos_before == 0


def has_eos(response: torch.Tensor, eos_id: int) -> torch.Tensor:
    return (response == eos_id).any(dim=1)


def pad_after_eos(response: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    return torch.where(response_mask(response, eos_id), response, torch.full_like(response, pad_id))


def model_inputs(query: torch.Tensor, response: torch.Tensor, pad_id: int, eos_id: int):
    """input_ids, attention_mask, position_ids for prompt+response (positions skip left pads)."""
    input_ids = torch.cat([query, response], dim=1)                                 # (B, P+R)
    mask = torch.cat([query != pad_id, response_mask(response, eos_id)], dim=1).long()
    position_ids = (torch.cumsum(mask, dim=1) - 1).clamp(min=0)
    return input_ids, mask, position_ids


def response_logits(model, query, response, pad_id, eos_id, temperature: float) -> torch.Tensor:
    """Logits / T that predict each response token: (B, R, V)."""
    input_ids, mask, pos = model_inputs(query, response, pad_id, eos_id)
    R = response.shape[1]
    # only the last R + 1 positions go through the LM head: (B, P+R, V) logits of a 50k-word
    # vocabulary and a 512-token prompt would not fit in memory; position t predicts token t+1
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                   logits_to_keep=R + 1).logits
    return logits[:, :-1].float() / temperature                                 # (B, R, V)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position: (B, R)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_logprob_sums(model, query, response, pad_id, eos_id, temperature: float = 1.0):
    """sum_t log pi(y_t | x, y_<t) over real response tokens (EOS included), float32: (B,).
    With gradients (DPO trains on it); sequence_logprobs is the same in no-grad batches."""
    logp = gather_logprobs(response_logits(model, query, response, pad_id, eos_id, temperature),
                           response)                                                  # (B, R)
    return (logp * response_mask(response, eos_id)).sum(dim=1)


@torch.inference_mode()
def sequence_logprobs(model, query, response, pad_id, eos_id, temperature: float = 1.0,
                      batch_size: int = 256) -> torch.Tensor:
    """response_logprob_sums in batches, no gradients (the density ratios' l_sft and l_k): (B,)."""
    if len(query) == 0:                        # a torchrun rank with no rows
        return torch.zeros(0, device=query.device)
    return torch.cat([response_logprob_sums(model, query[i:i + batch_size],
                                            response[i:i + batch_size], pad_id, eos_id, temperature)
                      for i in range(0, len(query), batch_size)])


def last_token_index(query: torch.Tensor, response: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index in prompt+response of the last real response token (the EOS, if there is one)."""
    return query.shape[1] + response_mask(response, eos_id).sum(dim=1) - 1


def pair_reward_scores(rm, query, chosen, rejected, pad_id, eos_id):
    """reward_scores of (query, chosen) and of (query, rejected), each prompt computed once.

    Returns the two (B,) score tensors.

    Under causal attention a prompt's keys and values do not depend on the response after it, so
    one forward over the B prompts fills a KV cache that both responses of a pair then attend to.
    The simple equivalent is reward_scores on (query, chosen) and on (query, rejected): the
    scores and their gradients are those two full forwards' (tests/test_math.py
    test_pair_scores_share_the_prompt_exactly, test_pair_scores_under_gradient_checkpointing,
    and tests/test_tldr_preset.py on GPT-NeoX and Llama); the prompt tokens are
    processed once instead of twice, which on TL;DR (512-token prompts, 53-token responses) is
    ~45% fewer tokens per RM step. transformers switches the cache off in a checkpointed model in
    train mode, so there the 2B full sequences go through one forward instead.
    """
    if getattr(rm.base_model, "gradient_checkpointing", False) and rm.base_model.training:
        scores = reward_scores(rm, torch.cat([query, query]), torch.cat([chosen, rejected]),
                               pad_id, eos_id)
        return scores.chunk(2)
    B, P = query.shape
    # the layout of the 2B full sequences, rows x_0 y_c0, x_0 y_r0, x_1 y_c1, ...: the prompt
    # columns of every other row are the prompts' own mask and positions
    query2 = query.repeat_interleave(2, dim=0)
    response = torch.stack([chosen, rejected], dim=1).flatten(0, 1)              # (2B, R)
    _, mask, pos = model_inputs(query2, response, pad_id, eos_id)               # (2B, P+R)
    cache = rm.base_model(input_ids=query, attention_mask=mask[::2, :P], position_ids=pos[::2, :P],
                          use_cache=True).cache
    cache.batch_repeat_interleave(2)                        # the same row order as query2
    hidden = rm.base_model(input_ids=response, attention_mask=mask, position_ids=pos[:, P:],
                           cache=cache, use_cache=True).last_hidden_state       # (2B, R, H)
    last = last_token_index(query2, response, eos_id) - P   # the EOS, or the last token if none
    scores = centred_head(rm, hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[-1])))
    return scores.squeeze(1).view(B, 2).unbind(dim=1)


def centred_head(rm, hidden: torch.Tensor) -> torch.Tensor:
    """The scalar head on hidden states, minus the RM's centring bias: (..., H) -> (...), float32.

    The one place where the bias is subtracted. The RM's reward (read at the EOS), and PPO's value
    model (a copy of the RM read at every state, as the authors' critic is) both go through it, so
    a model made from an RM never sees its scores off by `reward_bias`.
    """
    return rm.score(hidden).squeeze(-1).float() - getattr(rm.config, "reward_bias", 0.0)


def head_scores(rm, query, response, pad_id, eos_id) -> torch.Tensor:
    """centred_head at every position of prompt+response: (B, P+R). Position i reads the hidden
    state after token i, so P - 1 + t is the state from which response token t is chosen."""
    input_ids, mask, pos = model_inputs(query, response, pad_id, eos_id)
    hidden = rm.base_model(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                           use_cache=False).last_hidden_state                  # no KV cache kept
    return centred_head(rm, hidden)                                             # (B, P+R)


def reward_scores(rm, query, response, pad_id, eos_id) -> torch.Tensor:
    """RM score read at the last real token (EOS) of each response, minus the RM's centring bias.

    We call the backbone and the scalar head ourselves rather than rely on the library's pooling,
    so the position is the same in training, in PPO and in the tests: (B,).
    """
    idx = last_token_index(query, response, eos_id)
    return head_scores(rm, query, response, pad_id, eos_id).gather(1, idx.unsqueeze(1)).squeeze(1)


@torch.no_grad()
def score_responses(rm, query, response, pad_id, eos_id, no_eos_score: float = -1.0):
    """The RM's reward as PPO uses it: the score at the EOS token, or `no_eos_score` for a
    response that never ends (docs/method.md section 4): (B,)."""
    score = reward_scores(rm, query, response, pad_id, eos_id)
    return torch.where(has_eos(response, eos_id), score, torch.full_like(score, no_eos_score))


@torch.no_grad()   # not inference_mode: PPO's losses use these log-probs next to autograd tensors
def sample(model, query, pad_id, eos_id, max_new_tokens: int, temperature: float,
           generator: torch.Generator, stage: str = "sample", step: int | None = None):
    """Sample responses with a KV cache at temperature T, no early stop (fixed length).

    Returns response (B, R) with pad after the first EOS, and the per-token log-probs of the
    sampled tokens under softmax(logits / T), which PPO reuses as the rollout log-probs. The
    simple equivalent is one full forward over prompt + response after sampling; the cache gives
    the same log-probs (tests/test_math.py test_sampled_logprobs_equal_a_full_forward).
    Non-finite logits (a diverged policy) stop `stage` with a one-line error naming `step`.
    """
    B = query.shape[0]
    mask = (query != pad_id).long()
    pos = (torch.cumsum(mask, dim=1) - 1).clamp(min=0)
    out = model(input_ids=query, attention_mask=mask, position_ids=pos, use_cache=True,
                logits_to_keep=1)                          # the prompt's other logits are unused
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        check_finite(out.logits[:, -1], "policy logits", stage, step)
        logp = torch.log_softmax(out.logits[:, -1].float() / temperature, dim=-1)   # (B, V)
        tok = torch.multinomial(logp.exp(), 1, generator=generator)                # (B, 1)
        tokens.append(tok)
        logps.append(logp.gather(1, tok))
        # Every sampled token is attended to while sampling; post-EOS tokens are padded below
        # and masked out of every statistic, so what follows an EOS never matters.
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=tok, attention_mask=mask, position_ids=pos,
                    cache=out.cache, use_cache=True)   # transformers 5.x: `cache`, not past_key_values
    response = torch.cat(tokens, dim=1)
    logp = torch.cat(logps, dim=1)
    real = response_mask(response, eos_id)
    return pad_after_eos(response, eos_id, pad_id), logp * real


def decode_responses(tokenizer, response: torch.Tensor, eos_id: int) -> tuple[list[str], list[bool]]:
    """Text of each response without the EOS/pad, and whether it ended with an EOS."""
    mask = response_mask(response, eos_id)
    texts = []
    for row, m in zip(response.tolist(), mask.tolist()):
        words = [t for t, keep in zip(row, m) if keep and t != eos_id]
        texts.append(tokenizer.decode(words))
    return texts, has_eos(response, eos_id).tolist()


# ----------------------------------------------------------------------------------------------
# Evaluation on the fixed held-out prompts: one protocol for every arm (PPO stages and DPO/WPO)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class HeldOut:
    """The fixed held-out set every arm is evaluated on, and what judges a response there: the
    task's gold reward, the arm's RM (the proxy) and pi_sft (KL to SFT)."""
    task: object
    tokenizer: object
    prompts: list
    references: list
    query: torch.Tensor                  # the prompts, encoded and left-padded
    sft: torch.nn.Module
    rm: torch.nn.Module
    batch_size: int                      # sequences per no-grad forward
    no_eos_score: float                  # the RM score of a response that never ends


EVAL_PROMPTS = 512   # held-out prompts of every arm's evaluation (ppo.py, dpo.py): report.py compares
#                      arms only on the same set, so both default to this one number


def held_out(task, tokenizer, n: int, sft, rm, batch_size: int, no_eos_score: float, device) -> HeldOut:
    prompts, references = task.eval_examples(n)
    query = encode_prompts(tokenizer, prompts, task.max_prompt_len).to(device)
    return HeldOut(task, tokenizer, prompts, references, query, sft, rm, batch_size, no_eos_score)


@torch.inference_mode()
def evaluate(policy, held: HeldOut, temperature: float, stage: str, step: int | None = None,
             seed: int = 0):
    """Gold, proxy and KL to SFT of `policy` on the held-out prompts (fixed sampling seed).

    Returns (stats, per-prompt gold, response texts)."""
    task, tokenizer, prompts, query, sft, rm = (held.task, held.tokenizer, held.prompts, held.query,
                                                held.sft, held.rm)
    batch_size, no_eos_score = held.batch_size, held.no_eos_score
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    gen = torch.Generator(device=query.device).manual_seed(seed)
    response, logp, logp_sft, proxy = [], [], [], []
    for q in query.split(batch_size):
        r, lp = sample(policy, q, pad, eos, task.response_len, temperature, gen, stage, step)
        m = response_mask(r, eos)
        logp_sft.append(gather_logprobs(response_logits(sft, q, r, pad, eos, temperature), r) * m)
        proxy.append(score_responses(rm, q, r, pad, eos, no_eos_score))
        response.append(r)
        logp.append(lp)
    response, logp, logp_sft = torch.cat(response), torch.cat(logp), torch.cat(logp_sft)
    texts, ended = decode_responses(tokenizer, response, eos)
    gold = task.gold(prompts, texts, ended)
    return {
        "gold": gold.mean().item(),
        # how far another held-out set of this size could move the mean: std over prompts / sqrt(n)
        "gold_se": std_err_or_none(gold.tolist()),
        "proxy": torch.cat(proxy).mean().item(),
        "kl_to_sft": (logp - logp_sft).sum(dim=1).mean().item(),
        "response_length": response_mask(response, eos).sum(dim=1).float().mean().item(),
    }, gold, texts


def final_evaluation(policy, held: HeldOut, kl_to_sft: float, stage: str) -> dict:
    """final.json: near-greedy (T = 0.01) gold and proxy, gold win rates against the SFT policy's
    near-greedy responses and against the references (the paper's headline metric; ties count
    half), `kl_to_sft` as measured on the last T = 0.7 evaluation, samples, per-prompt gold."""
    final, gold_policy, texts = evaluate(policy, held, 0.01, stage)
    sft_final, gold_sft, _ = evaluate(held.sft, held, 0.01, stage)
    # the references as the policy would have written them: our tokens (<= R), decoded
    task, tokenizer, prompts, references = held.task, held.tokenizer, held.prompts, held.references
    eos = tokenizer.eos_token_id
    ref_texts, ref_ended = decode_responses(
        tokenizer, encode_responses(tokenizer, references, task.response_len), eos)
    gold_reference = task.gold(prompts, ref_texts, ref_ended)
    win_rate = lambda a, b: ((a > b).float() + 0.5 * (a == b).float()).mean().item()  # noqa: E731
    final["win_rate_vs_sft"] = win_rate(gold_policy, gold_sft)
    final["win_rate_vs_reference"] = win_rate(gold_policy, gold_reference)
    final["kl_to_sft"] = kl_to_sft
    final["sft"] = {"gold": sft_final["gold"], "gold_se": sft_final["gold_se"],  # same prompts
                    "proxy": sft_final["proxy"],                                 # and the same RM
                    "win_rate_vs_reference": win_rate(gold_sft, gold_reference)}
    final["samples"] = [{"prompt": p, "response": t} for p, t in zip(prompts[:8], texts[:8])]
    # per held-out prompt, in eval order: arms can be compared prompt by prompt (report.py)
    final["gold_per_prompt"] = gold_policy.tolist()
    return final


# ----------------------------------------------------------------------------------------------
# Checkpoints: Hugging Face directories (safetensors), checked before loading.
# ----------------------------------------------------------------------------------------------
def _check_checkpoint(path: str | Path, kind: str, what_to_run: str) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise StageError(f"{path} does not exist; run {what_to_run} first")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise StageError(f"{path} holds no model (no config.json); run {what_to_run} first")
    if (path / "pytorch_model.bin").exists() and not any(path.glob("*.safetensors")):
        raise StageError(f"{path} holds a pickle checkpoint; only safetensors are loaded")
    if not any(path.glob("*.safetensors")):
        raise StageError(f"{path} holds no safetensors weights; run {what_to_run} first")
    config = json.loads(config_file.read_text())
    archs = config.get("architectures") or []
    if kind == "policy" and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise StageError(f"{path} is not a policy (architectures {archs}); pass a policy "
                         f"checkpoint from sft.py or ppo.py")
    if kind == "reward" and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise StageError(f"{path} is not a reward model (architectures {archs}); pass an RM "
                         f"checkpoint from reward_model.py or ocrm_correct.py")
    if kind == "reward" and "reward_bias" not in config:
        raise StageError(f"{path} has no reward_bias: it is not a finished reward model")
    return config


# The embedded GPT-2 is tiny (2 layers, width 64, ~25-token sequences). At that size plain
# matmul-softmax ("eager") attention is faster on a CPU than SDPA's fused kernel (measured in
# benchmarks/README.md). transformers does not save that
# choice in config.json, so sft.py records it under ATTENTION_KEY (saved like any config field,
# and inherited by every RM and policy made from that SFT model) and every loader applies it.
# Hub models lack the key and keep the library's default, SDPA, the right kernel at 1B and 565
# tokens. The simple equivalent is to ignore the key (the library's SDPA): the same math, other
# float rounding (tests/test_math.py test_eager_and_sdpa_attention_are_the_same_function).
ATTENTION_KEY = "ocrm_attn_implementation"


def apply_attention(model):
    implementation = getattr(model.config, ATTENTION_KEY, None)
    if implementation:
        model.set_attn_implementation(implementation)
    return model


def _load(loader, path, device):
    try:
        model = loader.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
    except Exception as e:  # corrupt or truncated weights: say which file, not a 40-line trace
        raise StageError(f"could not load {path}: {type(e).__name__}: {str(e).splitlines()[0]}")
    return apply_attention(model).to(device).eval()


def load_tokenizer(path):
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise StageError(f"could not load a tokenizer from {path}: {str(e).splitlines()[0]}")


def load_pretrained_policy(name: str, gradient_checkpointing: bool = False):
    """A hub (or local) causal LM to start SFT from: dropout off, a pad token distinct from EOS.

    Pythia's tokenizer has no pad token, and padding with EOS would make the pad positions
    indistinguishable from the end of a response (docs/method.md section 5), so we add `[PAD]`.
    """
    tokenizer = load_tokenizer(name)
    if tokenizer.eos_token_id is None:
        raise StageError(f"the tokenizer of {name} has no EOS token; responses could never end")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    try:
        config = AutoConfig.from_pretrained(name)
        for key, value in config.to_dict().items():      # every dropout probability -> 0
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
        # fp32 master weights: Pythia's hub checkpoints are fp16, and transformers 5.x would keep
        # them so (dtype="auto"); AdamW at lr 3e-6 on fp16 weights stalls or diverges
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=torch.float32)
    except Exception as e:
        raise StageError(f"could not load the model {name}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:   # room for [PAD]
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model, tokenizer


def load_policy(path, device, what_to_run: str = "sft.py"):
    _check_checkpoint(path, "policy", what_to_run)
    return _load(AutoModelForCausalLM, path, device), load_tokenizer(path)


def load_reward_model(path, device, what_to_run: str = "reward_model.py"):
    _check_checkpoint(path, "reward", what_to_run)
    return _load(AutoModelForSequenceClassification, path, device), load_tokenizer(path)


def check_same_tokenizer(tok_a, tok_b, name_a: str, name_b: str) -> None:
    """Policy, reference, RM and value model must share one vocabulary and pad/EOS ids."""
    if (tok_a.get_vocab() != tok_b.get_vocab() or tok_a.pad_token_id != tok_b.pad_token_id
            or tok_a.eos_token_id != tok_b.eos_token_id):
        raise StageError(f"{name_a} and {name_b} use different tokenizers; train both from the "
                         f"same SFT checkpoint")


def check_micro_batch(micro_batch_size: int, batch_size: int, batch_name: str) -> None:
    """--micro_batch_size (0: the whole batch) must split a batch into equal pieces."""
    if micro_batch_size < 0 or batch_size % (micro_batch_size or batch_size):
        raise StageError(f"--micro_batch_size must divide {batch_name}")


def check_output(out: str | Path) -> None:
    """Fail before any work if `out` exists or could not be created (checked again on writing)."""
    out = Path(out)
    if out.exists():
        raise StageError(f"{out} already exists; delete it to redo this stage")
    parent = out.parent
    while not parent.exists():                 # the nearest ancestor that is already there
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise StageError(f"cannot write the output directory {out}: {parent} is not a writable "
                         f"directory")


@contextlib.contextmanager
def atomic_output(out: str | Path):
    """Write a stage's output under a temporary name and rename it when complete.

    A later stage (and run_all.sh) only ever sees a finished directory: an interrupted stage
    leaves at most `.NAME.tmp`, which the next attempt deletes and redoes.
    Under torchrun only rank 0 writes: the other ranks get None instead of a directory (the
    stages write under `if C.is_main():`, or through save_checkpoint). The rename waits until every rank has reached it, so
    a rank that died before leaves nothing finished, and every rank returns once it is done.
    """
    if not is_main():
        yield None
        barrier()                              # this rank is done ...
        barrier()                              # ... and rank 0 has renamed the output
        return
    out = Path(out)
    check_output(out)                          # again: it may have appeared since the stage began
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise StageError(f"cannot write the output directory {out}: {e.strerror}")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()                                  # every rank is done (a no-op with one process)
    os.replace(tmp, out)
    barrier()


def save_checkpoint(out: str | Path, model, tokenizer, files: dict) -> None:
    """A stage's model directory, written atomically (by rank 0 alone under torchrun): the model
    and tokenizer (save_pretrained: safetensors, config, tokenizer files) and `files`, each
    name -> a list (one JSON line per item) or anything else (one JSON document)."""
    with atomic_output(out) as tmp:
        if is_main():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            for name, content in files.items():
                if isinstance(content, list):
                    (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in content))
                else:
                    write_json(tmp / name, content)


def throughput(device: torch.device, tokens: int, seconds: float) -> dict:
    """Real (non-pad) tokens per second of a stage's main loop, and the peak GPU memory so far
    (None off CUDA): what PRESET=smoke is for, recorded in every stage's *_info.json."""
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return {"tokens_per_second": tokens / max(seconds, 1e-9), "peak_gpu_memory_gb": peak}


def throughput_text(info: dict) -> str:
    text = f"{info['tokens_per_second']:,.0f} tokens/s"
    if info["peak_gpu_memory_gb"] is not None:
        text += f", peak GPU memory {info['peak_gpu_memory_gb']:.1f} GB"
    return text


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def std_err_or_none(xs) -> float | None:
    """The standard error of the mean of xs (None for fewer than two values)."""
    std_err = mean_std_err(xs)[1]
    return None if math.isnan(std_err) else std_err


def mean_std_err(xs) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))
