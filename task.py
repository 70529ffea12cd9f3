"""The experiment's design: where prompts, reference answers and the gold reward come from.

sft.py picks the task and writes its spec to task.json beside the SFT checkpoint; every later
stage reads it back from --sft (`load_task`), so all stages of a run see the same data and the
same gold reward. Two kinds, with the same methods (the stages never ask which one they have):

  ToyTask   the embedded task below, built locally from its spec (no download)
  TextTask  any prompt/reference dataset (TL;DR in the paper) with a Hugging Face
            sequence-classification model as the gold reward (Skywork-Reward in the paper)

The embedded task: "list the prompt's items", a family of tasks
----------------------------------------------------------------
Prompt:    `list` + 2 to 8 distinct colour words          list teal gold navy
Response:  some of them joined by `and`, then <eos>       navy and teal <eos>
           (or by spaces only, `separator` "space")       navy teal <eos>
Gold:      sum of value(item) over the distinct prompt items named
           - mistake_penalty * (mistakes: a repeat, an off-prompt colour, a stray `and`, or
             any `and` when the separator is a space)
           - length_cost * k^2, k = colours in the answer (so each extra one costs more)
Reference: k items of the prompt, k drawn from `reference_lengths`, each item replaced by a random
           colour with probability `reference_mistake_rate` (`mistake_unit` "item"), or one item
           of the answer with that probability ("answer": the chance of a replacement does not
           grow with the length, so the stored pairs do not teach "shorter is safer").

Every knob is a field of the spec (and an sft.py flag); TOY_TASKS names the members the README
discusses. Which member makes which point, with the measurements, is in docs/experiments.md.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import random
import string
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

import common as C

# ----------------------------------------------------------------------------------------------
# The embedded task's vocabulary
# ----------------------------------------------------------------------------------------------
ITEMS = ("red", "blue", "green", "gold", "pink", "gray", "teal", "navy",
         "lime", "plum", "rose", "sand", "jade", "ruby", "mint", "rust")
PAD, EOS, UNK, LIST, AND = "<pad>", "<eos>", "<unk>", "list", "and"
MAX_PROMPT_SIZE = 8
RESPONSE_LEN = 2 * MAX_PROMPT_SIZE   # max new tokens: 8 items, 7 `and`s and <eos>
NO_EOS_GOLD = -1.0                   # gold of a response that never ends (PPO's RM score is -1 too)
HELD_OUT_SEED = 12345                # the fixed held-out prompts of every evaluation
MISTAKE_UNITS = ("item", "answer")   # what `reference_mistake_rate` applies to (module docstring)

# Per-colour values of the "values" members: 8 liked colours (+1.5 down to +0.8) and 8 disliked
# ones (-0.5 down to -1.2). The best answer names exactly the prompt's liked colours.
SIGNED_VALUES = tuple(round(1.5 - 0.1 * i, 2) for i in range(8)) + \
                tuple(round(-0.5 - 0.1 * i, 2) for i in range(8))

TOY_TASKS = {
    # the first design: every item is worth 1, references name 1..n items uniformly. On it the
    # near-greedy SFT policy already names almost every item (no headroom) and the policy exploits
    # repeats that SFT samples never contain (no coverage): the README's counter-example.
    "items": {"prompt_sizes": [2, 8], "reference_lengths": "uniform",
              "reference_mistake_rate": 0.03, "mistake_unit": "item",
              "item_values": [1.0] * len(ITEMS),
              "mistake_penalty": 1.0, "length_cost": 0.0, "separator": "and"},
    # liked and disliked colours: naming everything is about as good as naming nothing
    "values": {"prompt_sizes": [2, 8], "reference_lengths": "uniform",
               "reference_mistake_rate": 0.05, "mistake_unit": "item",
               "item_values": list(SIGNED_VALUES),
               "mistake_penalty": 1.0, "length_cost": 0.0, "separator": "and"},
    # the default: "values" with mistake-rich references (each item is replaced by a random colour
    # with probability 0.2, mostly an off-prompt colour or a repeat), so the stored SFT samples cover the mistakes PPO learns to exploit and
    # a re-weighted RM can learn them (docs/experiments.md, v15)
    "mistakes": {"prompt_sizes": [2, 8], "reference_lengths": "uniform",
                 "reference_mistake_rate": 0.2, "mistake_unit": "item",
                 "item_values": list(SIGNED_VALUES),
                 "mistake_penalty": 1.0, "length_cost": 0.0, "separator": "and"},
}
DEFAULT_TOY_TASK = "mistakes"


def toy_spec(name: str = DEFAULT_TOY_TASK, **overrides) -> dict:
    """The spec of a named member with some knobs changed (None leaves a knob as it is)."""
    if name not in TOY_TASKS:
        raise C.StageError(f"unknown --task {name!r}; the embedded tasks are {sorted(TOY_TASKS)}")
    spec = {"kind": "toy", "name": name, **TOY_TASKS[name]}
    spec.update({k: v for k, v in overrides.items() if v is not None})
    check_toy_spec(spec)
    return spec


def check_toy_spec(spec: dict) -> None:
    missing = [k for k in TOY_TASKS[DEFAULT_TOY_TASK] if k not in spec]
    if missing:
        raise C.StageError(f"the embedded task's spec lacks {missing}: it was written by another "
                           f"version of sft.py; redo the run")
    lo, hi = spec["prompt_sizes"]
    if not 2 <= lo <= hi <= MAX_PROMPT_SIZE:
        raise C.StageError(f"prompt sizes must satisfy 2 <= min <= max <= {MAX_PROMPT_SIZE}, "
                           f"got {lo}-{hi}")
    lengths = spec["reference_lengths"]
    if lengths != "uniform" and (not lengths or any(p < 0 for p in lengths) or sum(lengths) <= 0
                                 or len(lengths) > MAX_PROMPT_SIZE):
        raise C.StageError(f"reference lengths must be 'uniform' or at most {MAX_PROMPT_SIZE} "
                           f"non-negative weights for 1, 2, ... items, got {lengths}")
    if not 0 <= spec["reference_mistake_rate"] <= 1:
        raise C.StageError("the reference mistake rate must be in [0, 1]")
    if spec["mistake_unit"] not in MISTAKE_UNITS:
        raise C.StageError(f"the mistake unit must be 'item' or 'answer', "
                           f"got {spec['mistake_unit']!r}")
    if spec["separator"] not in (AND, "space"):
        raise C.StageError(f"the separator must be 'and' or 'space', got {spec['separator']!r}")
    if not (math.isfinite(spec["length_cost"]) and spec["length_cost"] >= 0):
        raise C.StageError("the length cost must be a number >= 0")
    if len(spec["item_values"]) != len(ITEMS) or not all(map(math.isfinite, spec["item_values"])):
        raise C.StageError(f"item values must be {len(ITEMS)} finite numbers, one per colour "
                           f"{ITEMS}")


@functools.lru_cache(maxsize=4)
def _item_sets(held_out: bool, lo: int, hi: int) -> dict[int, list[tuple[str, ...]]]:
    """The item sets of each prompt size lo..hi, split once and for all: every 10th set of the
    enumeration over all sizes 2..8 is held out, whatever sizes a task uses."""
    by_size, index = {}, 0
    for k in range(2, MAX_PROMPT_SIZE + 1):
        sets = list(itertools.combinations(ITEMS, k))
        if lo <= k <= hi:
            by_size[k] = [s for i, s in enumerate(sets, start=index) if (i % 10 == 0) == held_out]
        index += len(sets)
    return by_size


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer for the embedded task, built locally (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate((PAD, EOS, UNK, LIST, AND) + ITEMS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


class ToyTask:
    cheap_gold = True                       # gold is a Python function: log it on every update
    max_prompt_len = None

    def __init__(self, spec: dict | None = None):
        self.spec = toy_spec() if spec is None else spec
        check_toy_spec(self.spec)
        self.values = dict(zip(ITEMS, self.spec["item_values"]))
        # max new tokens: 8 items, the 7 `and`s between them (if any), and <eos>
        self.response_len = RESPONSE_LEN if self.spec["separator"] == AND else MAX_PROMPT_SIZE + 1

    # -- prompts -----------------------------------------------------------------------------
    def make_prompts(self, n: int, seed: int, held_out: bool = False) -> list[str]:
        """n prompts `list a b ...`: a uniform prompt size, then a set, in random order."""
        rng = random.Random(seed)
        lo, hi = self.spec["prompt_sizes"]
        by_size = _item_sets(held_out, lo, hi)
        prompts = []
        for _ in range(n):
            items = list(rng.choice(by_size[rng.choice(range(lo, hi + 1))]))
            rng.shuffle(items)
            prompts.append(" ".join([LIST] + items))
        return prompts

    def reference(self, prompt: str, rng: random.Random) -> str:
        """A human-like reference answer: k of the prompt's items, sometimes with a wrong one."""
        items = prompt.split()[1:]
        lengths = self.spec["reference_lengths"]
        if lengths == "uniform":
            k = rng.randint(1, len(items))
        else:   # the weights of 1..n items, renormalised over what this prompt allows; a prompt
            #     too short for every weighted length names all its items
            weights = (list(lengths) + [0.0] * len(items))[:len(items)]
            k = rng.choices(range(1, len(items) + 1), weights)[0] if sum(weights) > 0 else len(items)
        words = rng.sample(items, k)
        rate = self.spec["reference_mistake_rate"]
        if self.spec["mistake_unit"] == "item":     # each item may go wrong: longer, more mistakes
            for i in range(len(words)):
                if rng.random() < rate:
                    words[i] = rng.choice(ITEMS)    # may be off-prompt or a repeat
        elif rng.random() < rate:                   # "answer": at most one, whatever the length
            words[rng.randrange(len(words))] = rng.choice(ITEMS)
        return self.answer(words)

    def answer(self, words: list[str]) -> str:
        """Colours written as an answer: joined by `and`, or by spaces (`separator`)."""
        return f" {AND} ".join(words) if self.spec["separator"] == AND else " ".join(words)

    # -- the stages' views ---------------------------------------------------------------------
    def sft_examples(self, n: int, seed: int):
        rng = random.Random(seed)
        prompts = self.make_prompts(n, seed=seed)
        return prompts, [self.reference(p, rng) for p in prompts]

    def pair_prompts(self, n: int, seed: int) -> list[str]:
        return self.make_prompts(n, seed=seed + 1000)           # not the SFT prompts' stream

    def ppo_prompts(self, n: int, seed: int) -> list[str]:
        return self.make_prompts(n, seed=seed)

    def eval_examples(self, n: int):
        """The fixed held-out prompts of every evaluation, with one reference answer each."""
        rng = random.Random(HELD_OUT_SEED)
        prompts = self.make_prompts(n, seed=HELD_OUT_SEED, held_out=True)
        return prompts, [self.reference(p, rng) for p in prompts]

    def centring_examples(self, n: int, seed: int):
        rng = random.Random(seed)
        prompts = self.make_prompts(n, seed=seed + 2000, held_out=True)
        return prompts, [self.reference(p, rng) for p in prompts]

    # -- the gold reward -----------------------------------------------------------------------
    def gold_reward(self, prompt: str, response: str, has_eos: bool = True) -> float:
        """sum of value(item) over the distinct prompt items named - penalty * mistakes."""
        if not has_eos:
            return NO_EOS_GOLD
        items = set(prompt.split()[1:])
        words = response.split()
        named, mistakes = set(), 0
        for i, word in enumerate(words):
            if word == AND:                     # fine only between two non-`and` words
                between = 0 < i < len(words) - 1 and words[i - 1] != AND and words[i + 1] != AND
                mistakes += not (between and self.spec["separator"] == AND)
            elif word in items and word not in named:
                named.add(word)
            else:
                mistakes += 1                   # a repeat, an off-prompt word, or junk
        colours = sum(word != AND for word in words)
        # fsum: the exactly rounded sum, whatever order the set yields its items in. A plain sum
        # follows the set's order, which depends on the process's string-hash seed, so equal
        # golds (ties, broken by a coin) could differ in the last bit from one run to the next
        return (math.fsum(self.values[w] for w in named) - self.spec["mistake_penalty"] * mistakes
                - self.spec["length_cost"] * colours ** 2)

    def best_gold(self, prompt: str) -> float:
        """The highest gold any answer to `prompt` can get: its k most valuable items for the best
        k (an answer of just <eos>, k = 0, is worth 0)."""
        values = sorted((self.values[w] for w in prompt.split()[1:]), reverse=True)
        cost = self.spec["length_cost"]
        return max(sum(values[:k]) - cost * k ** 2 for k in range(len(values) + 1))

    def gold(self, prompts: list[str], texts: list[str], ended: list[bool]) -> torch.Tensor:
        return torch.tensor([self.gold_reward(p, t, e) for p, t, e in zip(prompts, texts, ended)],
                            dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# The paper's setting: a prompt/reference dataset and a gold reward model (docs/method.md)
# ----------------------------------------------------------------------------------------------
def load_text_dataset(spec: dict) -> tuple[list[dict], list[dict]]:
    """(train, held_out) rows (dicts of columns) of the run's dataset.

    `dataset` is a hub name (loaded with `dataset_config`), a local .json/.jsonl file, or a
    folder of JSON files, one split per file (a local directory, or an `hf://datasets/...` path,
    e.g. AlpacaFarm's alpaca_instructions/ with sft.json, unlabeled.json, preference.json,
    val.json). The training rows are the `train_splits` put together; held out is
    `held_out_split`, else the dataset's `validation` (else `test`) split; a dataset with one split
    (a local file) holds out every 10th row.
    """
    import datasets   # here, not at the top: the embedded task's stages never start it

    name, train_splits = spec["dataset"], spec.get("train_splits") or ["train"]
    held_split = spec.get("held_out_split")
    try:
        if Path(name).is_file():
            data = datasets.load_dataset("json", data_files=str(name))
        elif Path(name).is_dir() or name.startswith("hf://"):
            splits = train_splits + ([held_split] if held_split else [])
            found = {s: next((f"{name}/{s}{ext}" for ext in (".json", ".jsonl")
                              if not Path(name).is_dir() or Path(f"{name}/{s}{ext}").is_file()),
                             None) for s in splits}
            missing = [s for s, f in found.items() if f is None]
            if missing:
                raise C.StageError(f"the dataset folder {name} has no file for the split(s) "
                                   f"{missing} (SPLIT.json or SPLIT.jsonl)")
            data = datasets.load_dataset("json", data_files=found)
        else:
            data = datasets.load_dataset(name, spec.get("dataset_config"))
    except C.StageError:
        raise
    except Exception as e:
        raise C.StageError(f"could not load the dataset {name}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}")
    absent = [s for s in train_splits if s not in data]
    if absent:
        raise C.StageError(f"the dataset {name} has no split(s) {absent} (it has {list(data)}); "
                           f"set --train_splits")
    if held_split is None:
        held_split = next((s for s in ("validation", "test") if s in data), None)
    elif held_split not in data:
        raise C.StageError(f"the dataset {name} has no split {held_split!r} (it has {list(data)})")
    columns = template_fields(spec) + [spec["response_field"]]
    for split in train_splits + ([held_split] if held_split else []):
        missing = [f for f in columns if f not in data[split].column_names]
        if missing:
            raise C.StageError(f"the {split} split of {name} has no column(s) {missing}; it has "
                               f"{data[split].column_names}: set --prompt_field / "
                               f"--prompt_template / --response_field")

    train = [row for split in train_splits for row in data[split]]
    if held_split is not None:
        held_out = list(data[held_split])
    else:
        held_out = [r for i, r in enumerate(train) if i % 10 == 0]
        train = [r for i, r in enumerate(train) if i % 10 != 0]
    if not train or not held_out:
        raise C.StageError(f"the dataset {name} is too small: {len(train)} training and "
                           f"{len(held_out)} held-out rows")
    return train, held_out


def template_fields(spec: dict) -> list[str]:
    """The columns a prompt is made of: those the template names, or the prompt column."""
    template = spec.get("prompt_template")
    if template is None:
        return [spec["prompt_field"]]
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def format_prompt(row: dict, spec: dict, tokenizer=None) -> str:
    """The prompt of one row: its prompt column, or the template filled with its columns.

    With a tokenizer and a `truncate_field`, a prompt longer than max_prompt_len tokens is made to
    fit by cutting that field, at its last newline while it has one, else by the tokens it is
    over (AlpacaFarm's long `input`s; the instruction and the template's ending "REPLY:" stay).
    What still does not fit loses its start in encode_prompts."""
    template = spec.get("prompt_template")
    if template is None:
        return row[spec["prompt_field"]]
    fields = {f: row[f] for f in template_fields(spec)}
    text = template.format(**fields)
    field = spec.get("truncate_field")
    if tokenizer is None or field is None:
        return text
    count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])   # noqa: E731
    over = count(text) - spec["max_prompt_len"]
    while over > 0 and fields[field]:
        value = fields[field]
        cut = value.rfind("\n")
        if cut >= 0:
            fields[field] = value[:cut]
        else:                               # no newline left: drop the tokens it is over by
            ids = tokenizer(value, add_special_tokens=False)["input_ids"]
            fields[field] = tokenizer.decode(ids[:max(0, len(ids) - over)])
        text = template.format(**fields)
        over = count(text) - spec["max_prompt_len"]
    return text


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
        self.tokenizer = C.load_tokenizer(name)
        if self.tokenizer.pad_token_id is None:        # left padding makes the pad id irrelevant
            self.tokenizer.pad_token = self.tokenizer.eos_token   # (the score is read at an index)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype).eval()
        except Exception as e:
            raise C.StageError(f"could not load the gold reward model {name}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}")
        if self.model.config.num_labels != 1:
            raise C.StageError(f"the gold reward model {name} has {self.model.config.num_labels} "
                             f"outputs; a reward model has one")
        if not isinstance(getattr(self.model, "score", None), torch.nn.Module):
            raise C.StageError(f"the gold reward model {name} has no `score` head (a decoder "
                               f"LM's AutoModelForSequenceClassification has one)")
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
                # left padding: the last position is every row's last real token
                input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
                mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
                # the head at the last position, explicitly: the library's pooling reads the
                # last token that is not the pad id, which is one token early when pad = EOS and
                # the chat template ends in EOS
                pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
                hidden = self.model.base_model(input_ids=input_ids.to(self.device),
                                               attention_mask=mask.to(self.device),
                                               position_ids=pos.to(self.device)).last_hidden_state
                out.append(self.model.score(hidden[:, -1]).float()[:, 0].cpu())
        finally:
            self.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return torch.cat(out)


class TextTask:
    """Prompts and references from a dataset; gold = a Hugging Face reward model (docs/method.md section 6)."""
    cheap_gold = False                      # an 8B forward per batch: gold only at evaluations

    def __init__(self, spec: dict, device="cpu", tokenizer=None):
        """`tokenizer` (the policy's) lets a template's truncate_field be cut to fit the prompt
        length; every stage passes it (load_task reads it from the SFT directory)."""
        self.spec = spec
        self.max_prompt_len = spec["max_prompt_len"]
        self.response_len = spec["response_len"]
        prefix = spec["response_prefix"]

        def pairs(rows):                    # (prompt, reference) of each row
            return [(format_prompt(r, spec, tokenizer), prefix + r[spec["response_field"]])
                    for r in rows]

        train, held_out = load_text_dataset(spec)
        self.train, self.held_out = pairs(train), pairs(held_out)
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


TASK_FILE = "task.json"


def load_task(sft_dir, device="cpu"):
    """The task a run's SFT stage was made with (sft.py writes task.json beside the policy)."""
    file = Path(sft_dir) / TASK_FILE
    if not file.is_file():
        raise C.StageError(f"{sft_dir} has no {TASK_FILE}; pass an SFT checkpoint made by sft.py")
    spec = json.loads(file.read_text())
    if spec.get("kind") == "toy":
        return ToyTask(spec)
    if spec.get("kind") == "text":
        return TextTask(spec, device, C.load_tokenizer(sft_dir))
    raise C.StageError(f"{file} names an unknown task kind {spec.get('kind')!r}")
