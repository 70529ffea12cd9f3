"""Shared plumbing for every stage: the embedded task, tokenizer, gold reward, sampling,
sequence log-probs, reward-model scoring, checkpoint I/O, seeding and devices.

Nothing in here is OCRM-specific math; each stage's algorithm lives in its own file
(sft.py, reward_model.py, ppo.py, ocrm_correct.py). What is here is written once because
several stages need exactly the same thing, and "exactly the same" matters: the paper's
density ratio compares log-probs computed by the same code path (PAPER.md section 5).

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
import functools
import itertools
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
import datasets  # noqa: E402  (after the env var above)
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
datasets.disable_progress_bars()


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


def check_finite(value: float | torch.Tensor, what: str, stage: str, step: int | None = None) -> None:
    """Stop the stage if a loss, reward or weight is NaN or inf (nothing non-finite is saved)."""
    t = torch.as_tensor(value)
    if not torch.isfinite(t).all():
        at = "" if step is None else f" at update {step}"
        raise StageError(f"{stage}: non-finite {what}{at}; lower the learning rate or check the "
                         f"inputs")


# ----------------------------------------------------------------------------------------------
# The embedded task: "list the prompt's items".
# Prompt:   `list` + 2 to 8 distinct colour words.   e.g.  list red blue gold
# Response: items joined by `and`, then <eos>.        e.g.  gold and red <eos>
# Gold reward = (distinct prompt items named) - (mistakes), where a mistake is a repeated item,
# an item not in the prompt, or an `and` that does not stand between two items.
# The reference answers name between one and all of the items, almost never wrongly, so on SFT
# samples a longer answer is a better answer. Length is a cheap feature a reward model learns
# at once; whether one more item is still good depends on how many the prompt has (a relation
# between prompt and response that a small reward model learns poorly). PPO can lengthen the
# answer to a short prompt with repeats, which the proxy RM likes and the gold reward punishes.
# ----------------------------------------------------------------------------------------------
ITEMS = ("red", "blue", "green", "gold", "pink", "gray", "teal", "navy",
         "lime", "plum", "rose", "sand", "jade", "ruby", "mint", "rust")
PAD, EOS, UNK, LIST, AND = "<pad>", "<eos>", "<unk>", "list", "and"
PROMPT_SIZES = range(2, 9)   # items in a prompt
RESPONSE_LEN = 16            # max new tokens: 8 items, 7 `and`s and <eos>
REFERENCE_MISTAKE_PROB = 0.03  # chance that a reference item is replaced by a random colour
NO_EOS_GOLD = -1.0           # gold reward of a response that never ends (mirrors PPO's -1 score)


@functools.lru_cache(maxsize=2)
def _item_sets(held_out: bool) -> list[tuple[str, ...]]:
    """All item sets of every prompt size, split once and for all: every 10th set is held out."""
    sets = [s for k in PROMPT_SIZES for s in itertools.combinations(ITEMS, k)]
    return [s for i, s in enumerate(sets) if (i % 10 == 0) == held_out]


def make_prompts(n: int, seed: int, held_out: bool = False) -> list[str]:
    """n prompt strings `list a b ...`: a uniform prompt size, then a set, in random order."""
    rng = random.Random(seed)
    by_size = {k: [s for s in _item_sets(held_out) if len(s) == k] for k in PROMPT_SIZES}
    prompts = []
    for _ in range(n):
        items = list(rng.choice(by_size[rng.choice(PROMPT_SIZES)]))
        rng.shuffle(items)
        prompts.append(" ".join([LIST] + items))
    return prompts


def eval_prompts(n: int = 512) -> list[str]:
    """The fixed held-out prompt set used for every evaluation, in every run and seed."""
    return make_prompts(n, seed=12345, held_out=True)


def reference_response(prompt: str, rng: random.Random) -> str:
    """A human-like reference answer: 1 to all of the items (uniform), rarely with a wrong one."""
    items = prompt.split()[1:]
    words = rng.sample(items, rng.randint(1, len(items)))
    for i in range(len(words)):
        if rng.random() < REFERENCE_MISTAKE_PROB:
            words[i] = rng.choice(ITEMS)        # may be off-prompt or a repeat
    return f" {AND} ".join(words)


def gold_reward(prompt: str, response: str, has_eos: bool = True) -> float:
    """Programmatic gold reward: distinct prompt items named minus mistakes."""
    if not has_eos:
        return NO_EOS_GOLD
    items = set(prompt.split()[1:])
    words = response.split()
    named, mistakes = set(), 0
    for i, word in enumerate(words):
        if word == AND:                         # fine only between two non-`and` words
            between = 0 < i < len(words) - 1 and words[i - 1] != AND and words[i + 1] != AND
            mistakes += not between
        elif word in items and word not in named:
            named.add(word)
        else:
            mistakes += 1                       # a repeat, an off-prompt word, or junk
    return float(len(named) - mistakes)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer for the embedded task, built locally (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate((PAD, EOS, UNK, LIST, AND) + ITEMS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


# ----------------------------------------------------------------------------------------------
# Seeding and devices
# ----------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """`auto` -> cuda if present else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StageError("--device cuda was asked for but this machine has no CUDA; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise StageError(f"unknown --device {name!r}; use auto, cpu or cuda") from None


def autocast(device: torch.device):
    """bf16 autocast on CUDA for forward/backward passes; a no-op on CPU (fp32 there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Tensors for (prompt, response) pairs
# ----------------------------------------------------------------------------------------------
def encode_prompts(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Left-padded prompt ids (B, P)."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(x) for x in ids)
    return torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids])


def encode_responses(tokenizer, responses: list[str], length: int = RESPONSE_LEN) -> torch.Tensor:
    """Response ids (B, R): the words, then <eos>, then pad. Truncated to R tokens."""
    rows = []
    for r in responses:
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
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos).logits
    P = query.shape[1]
    return logits[:, P - 1:-1].float() / temperature          # position t predicts token t+1


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position: (B, R)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.inference_mode()
def sequence_logprobs(model, query, response, pad_id, eos_id, temperature: float = 1.0,
                      batch_size: int = 256) -> torch.Tensor:
    """sum_t log pi(y_t | x, y_<t) over real response tokens (EOS included), float32: (B,)."""
    out = []
    for i in range(0, len(query), batch_size):
        q, r = query[i:i + batch_size], response[i:i + batch_size]
        logp = gather_logprobs(response_logits(model, q, r, pad_id, eos_id, temperature), r)
        out.append((logp * response_mask(r, eos_id)).sum(dim=1))
    return torch.cat(out)


def last_token_index(query: torch.Tensor, response: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index in prompt+response of the last real response token (the EOS, if there is one)."""
    return query.shape[1] + response_mask(response, eos_id).sum(dim=1) - 1


def reward_scores(rm, query, response, pad_id, eos_id) -> torch.Tensor:
    """RM score read at the last real token (EOS) of each response, minus the RM's centring bias.

    We call the backbone and the scalar head ourselves rather than rely on the library's pooling,
    so the position is the same in training, in PPO and in the tests: (B,).
    """
    input_ids, mask, pos = model_inputs(query, response, pad_id, eos_id)
    hidden = rm.base_model(input_ids=input_ids, attention_mask=mask, position_ids=pos).last_hidden_state
    per_token = rm.score(hidden).squeeze(-1).float()                              # (B, P+R)
    idx = last_token_index(query, response, eos_id)
    return per_token.gather(1, idx.unsqueeze(1)).squeeze(1) - getattr(rm.config, "reward_bias", 0.0)


@torch.no_grad()
def score_responses(rm, query, response, pad_id, eos_id, no_eos_score: float = -1.0):
    """The RM's reward as PPO uses it: the score at the EOS token, or `no_eos_score` for a
    response that never ends (PAPER.md section 4): (B,)."""
    score = reward_scores(rm, query, response, pad_id, eos_id)
    return torch.where(has_eos(response, eos_id), score, torch.full_like(score, no_eos_score))


@torch.no_grad()   # not inference_mode: PPO's losses use these log-probs next to autograd tensors
def sample(model, query, pad_id, eos_id, max_new_tokens: int, temperature: float,
           generator: torch.Generator, stage: str = "sample", step: int | None = None):
    """Sample responses with a KV cache at temperature T, no early stop (fixed length).

    Returns response (B, R) with pad after the first EOS, and the per-token log-probs of the
    sampled tokens under softmax(logits / T), which PPO reuses as the rollout log-probs.
    Non-finite logits (a diverged policy) stop `stage` with a one-line error naming `step`.
    """
    B = query.shape[0]
    mask = (query != pad_id).long()
    pos = (torch.cumsum(mask, dim=1) - 1).clamp(min=0)
    out = model(input_ids=query, attention_mask=mask, position_ids=pos, use_cache=True)
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


def gold_rewards(prompts: list[str], texts: list[str], ended: list[bool]) -> torch.Tensor:
    return torch.tensor([gold_reward(p, t, e) for p, t, e in zip(prompts, texts, ended)])


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


def _load(loader, path, device):
    try:
        model = loader.from_pretrained(path, use_safetensors=True)
    except Exception as e:  # corrupt or truncated weights: say which file, not a 40-line trace
        raise StageError(f"could not load {path}: {type(e).__name__}: {str(e).splitlines()[0]}")
    return model.to(device).eval()


def load_tokenizer(path):
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise StageError(f"could not load a tokenizer from {path}: {str(e).splitlines()[0]}")


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
    """
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
    os.replace(tmp, out)


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def mean_std_err(xs) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))
