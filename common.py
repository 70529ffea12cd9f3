"""Shared plumbing for every stage: the tasks (the embedded one and any prompt/reference dataset
with a Hugging Face gold reward model), tokenizer, sampling, sequence log-probs, reward-model
scoring, checkpoint I/O, seeding and devices.

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
    AutoConfig,
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
# Tasks: where the prompts, the reference responses and the gold reward come from.
# sft.py chooses the task and writes it to task.json beside the SFT checkpoint; every later stage
# reads it from --sft, so all stages of a run see the same data and the same gold reward.
#   ToyTask   the embedded task above (no download)
#   TextTask  any prompt/reference dataset (TL;DR in the paper) and a Hugging Face
#             sequence-classification model as the gold reward (Skywork-Reward in the paper)
# Both give the same methods; the stages never ask which one they have.
# ----------------------------------------------------------------------------------------------
TASK_FILE = "task.json"


class ToyTask:
    cheap_gold = True                       # gold is a Python function: log it on every update
    max_prompt_len = None
    response_len = RESPONSE_LEN

    spec = {"kind": "toy"}

    def sft_examples(self, n: int, seed: int):
        rng = random.Random(seed)
        prompts = make_prompts(n, seed=seed)
        return prompts, [reference_response(p, rng) for p in prompts]

    def pair_prompts(self, n: int, seed: int) -> list[str]:
        return make_prompts(n, seed=seed + 1000)           # not the SFT prompts' stream

    def ppo_prompts(self, n: int, seed: int) -> list[str]:
        return make_prompts(n, seed=seed)

    def eval_examples(self, n: int):
        """The fixed held-out prompts of every evaluation, with one reference answer each."""
        rng = random.Random(12345)
        prompts = eval_prompts(n)
        return prompts, [reference_response(p, rng) for p in prompts]

    def centring_examples(self, n: int, seed: int):
        rng = random.Random(seed)
        prompts = make_prompts(n, seed=seed + 2000, held_out=True)
        return prompts, [reference_response(p, rng) for p in prompts]

    def gold(self, prompts: list[str], texts: list[str], ended: list[bool]) -> torch.Tensor:
        return gold_rewards(prompts, texts, ended)


def load_text_dataset(name: str, prompt_field: str, response_field: str):
    """(train, held_out) lists of (prompt, reference) from a hub dataset or a local JSON/JSONL file.

    Held out is the dataset's `validation` (else `test`) split; a dataset with one split (a local
    file) holds out every 10th row.
    """
    try:
        if Path(name).is_file():
            data = datasets.load_dataset("json", data_files=str(name))
        else:
            data = datasets.load_dataset(name)
    except Exception as e:
        raise StageError(f"could not load the dataset {name}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}")
    if "train" not in data:
        raise StageError(f"the dataset {name} has no train split (it has {list(data)})")
    held_name = next((s for s in ("validation", "test") if s in data), None)
    for split in ("train", held_name):
        if split is None:
            continue
        missing = [f for f in (prompt_field, response_field) if f not in data[split].column_names]
        if missing:
            raise StageError(f"the {split} split of {name} has no column(s) {missing}; it has "
                             f"{data[split].column_names}: set --prompt_field / --response_field")

    def rows(split):
        return list(zip(split[prompt_field], split[response_field]))

    train = rows(data["train"])
    if held_name is not None:
        held_out = rows(data[held_name])
    else:
        held_out = [r for i, r in enumerate(train) if i % 10 == 0]
        train = [r for i, r in enumerate(train) if i % 10 != 0]
    if not train or not held_out:
        raise StageError(f"the dataset {name} is too small: {len(train)} training and "
                         f"{len(held_out)} held-out rows")
    return train, held_out


def _take(rows: list, n: int, seed: int) -> list:
    """n rows in a seeded random order, going round again if n > len(rows); n = 0 means all."""
    n = n or len(rows)
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        out += rng.sample(rows, len(rows))
    return out[:n]


class GoldRewardModel:
    """A Hugging Face sequence classifier as the gold reward, with its own tokenizer.

    Our responses are token ids of the policy's tokenizer; the gold RM has another one. So: decode
    to text, put prompt and response into the gold tokenizer's chat template (user turn, assistant
    turn) when it has one, else concatenate them, re-encode with the gold tokenizer, and score in
    batches. The model sits in CPU memory and moves to the device only while it scores (an 8B
    gold RM and a policy being trained do not fit one GPU together); bf16 on CUDA.
    """

    def __init__(self, name: str, device, batch_size: int = 16, max_len: int = 1024):
        self.name, self.device = name, torch.device(device)
        self.batch_size, self.max_len = batch_size, max_len
        self.tokenizer = load_tokenizer(name)
        if self.tokenizer.pad_token_id is None:        # left padding makes the pad id irrelevant
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype).eval()
        except Exception as e:
            raise StageError(f"could not load the gold reward model {name}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}")
        if self.model.config.num_labels != 1:
            raise StageError(f"the gold reward model {name} has {self.model.config.num_labels} "
                             f"outputs; a reward model has one")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.requires_grad_(False)

    def encode(self, prompt: str, response: str) -> list[int]:
        """Gold-tokenizer ids of one (prompt, response), at most max_len (the start is cut)."""
        if self.tokenizer.chat_template:
            chat = [{"role": "user", "content": prompt.strip()},
                    {"role": "assistant", "content": response.strip()}]
            text = self.tokenizer.apply_chat_template(chat, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]  # template has BOS
        else:
            ids = self.tokenizer(prompt + response)["input_ids"]
        return ids[-self.max_len:]

    @torch.inference_mode()
    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Gold score of each (prompt, response), float32 on the CPU: (N,)."""
        pad = self.tokenizer.pad_token_id
        out = []
        self.model.to(self.device)
        try:
            for i in range(0, len(prompts), self.batch_size):
                ids = [self.encode(p, r) for p, r in zip(prompts[i:i + self.batch_size],
                                                         responses[i:i + self.batch_size])]
                width = max(len(x) for x in ids)
                # left padding: the last position is every row's last real token, which is where
                # the classifier reads its score
                input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
                mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
                logits = self.model(input_ids=input_ids.to(self.device),
                                    attention_mask=mask.to(self.device)).logits
                out.append(logits[:, 0].float().cpu())
        finally:
            self.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return torch.cat(out)


class TextTask:
    """Prompts and references from a dataset; gold = a Hugging Face reward model (PAPER.md s. 6)."""
    cheap_gold = False                      # an 8B forward per batch: gold only at evaluations

    def __init__(self, spec: dict, device="cpu"):
        self.spec = spec
        self.max_prompt_len = spec["max_prompt_len"]
        self.response_len = spec["response_len"]
        self.train, self.held_out = load_text_dataset(spec["dataset"], spec["prompt_field"],
                                                      spec["response_field"])
        self.device = device
        self._gold = None                   # loaded on first use: SFT never needs it

    def sft_examples(self, n: int, seed: int):
        prompts, references = zip(*_take(self.train, n, seed))
        return list(prompts), list(references)

    def pair_prompts(self, n: int, seed: int) -> list[str]:
        return [p for p, _ in _take(self.train, n, seed + 1000)]

    def ppo_prompts(self, n: int, seed: int) -> list[str]:
        return [p for p, _ in _take(self.train, n, seed)]

    def eval_examples(self, n: int):
        prompts, references = zip(*self.held_out[:n])
        return list(prompts), list(references)

    def centring_examples(self, n: int, seed: int):
        prompts, references = zip(*_take(self.held_out, min(n, len(self.held_out)), seed + 2000))
        return list(prompts), list(references)

    def gold(self, prompts: list[str], texts: list[str], ended: list[bool]) -> torch.Tensor:
        """The gold RM scores the text as it is; a response without EOS is scored truncated."""
        if self._gold is None:
            s = self.spec
            self._gold = GoldRewardModel(s["gold_model"], self.device, s["gold_batch_size"],
                                         s["gold_max_len"])
        return self._gold.score(prompts, texts)


def save_task(task, directory: Path) -> None:
    write_json(Path(directory) / TASK_FILE, task.spec)


def load_task(sft_dir, device="cpu"):
    """The task a run's SFT stage was made with (an SFT directory without task.json is the toy)."""
    file = Path(sft_dir) / TASK_FILE
    spec = json.loads(file.read_text()) if file.is_file() else {"kind": "toy"}
    if spec.get("kind") == "toy":
        return ToyTask()
    if spec.get("kind") == "text":
        return TextTask(spec, device)
    raise StageError(f"{file} names an unknown task kind {spec.get('kind')!r}")


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
def encode_prompts(tokenizer, prompts: list[str], max_len: int | None = None) -> torch.Tensor:
    """Left-padded prompt ids (B, P); a prompt longer than max_len keeps its LAST max_len tokens
    (the end of a prompt, e.g. TL;DR's closing "TL;DR:", is what the response continues)."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if max_len is not None:
        ids = [x[-max_len:] for x in ids]
    width = max(len(x) for x in ids)
    return torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids])


def encode_responses(tokenizer, responses: list[str], length: int = RESPONSE_LEN) -> torch.Tensor:
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


def pair_reward_scores(rm, query, chosen, rejected, pad_id, eos_id):
    """reward_scores of (query, chosen) and of (query, rejected), each prompt computed once.

    Returns the two (B,) score tensors.

    Under causal attention a prompt's keys and values do not depend on the response after it, so
    one forward over the B prompts fills a KV cache that both responses of a pair then attend to.
    The scores and their gradients are those of two full forwards (tested); the prompt tokens are
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
    per_token = rm.score(hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[-1])))
    scores = per_token.squeeze(-1).squeeze(-1).float() - getattr(rm.config, "reward_bias", 0.0)
    return scores.view(B, 2).unbind(dim=1)


def reward_scores(rm, query, response, pad_id, eos_id) -> torch.Tensor:
    """RM score read at the last real token (EOS) of each response, minus the RM's centring bias.

    We call the backbone and the scalar head ourselves rather than rely on the library's pooling,
    so the position is the same in training, in PPO and in the tests: (B,).
    """
    input_ids, mask, pos = model_inputs(query, response, pad_id, eos_id)
    hidden = rm.base_model(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                           use_cache=False).last_hidden_state                  # no KV cache kept
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


# The embedded GPT-2 is tiny (2 layers, width 64, ~25-token sequences). At that size plain
# matmul-softmax ("eager") attention is faster on a CPU than SDPA's fused kernel: -15% per PPO
# update and -9% per RM step (benchmarks/ppo_throughput.py). transformers does not save that
# choice in config.json, so sft.py records it under ATTENTION_KEY (saved like any config field,
# and inherited by every RM and policy made from that SFT model) and every loader applies it.
# Hub models lack the key and keep the library's default, SDPA, the right kernel at 1B and 565
# tokens.
ATTENTION_KEY = "ocrm_attn_implementation"


def apply_attention(model):
    implementation = getattr(model.config, ATTENTION_KEY, None)
    if implementation:
        model.set_attn_implementation(implementation)
    return model


def _load(loader, path, device):
    try:
        model = loader.from_pretrained(path, use_safetensors=True)
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
    indistinguishable from the end of a response (PAPER.md section 5), so we add `[PAD]`.
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
        model = AutoModelForCausalLM.from_pretrained(name, config=config)
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
