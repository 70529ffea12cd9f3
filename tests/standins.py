"""Local stand-ins for the paper's setting, built offline in seconds (no hub access here).

Same formats as the real things, tiny sizes:
- a JSONL file in the schema of Huang et al.'s preprocessed TL;DR (`query` ends in "TL;DR:",
  `reference_response` starts with a space and ends in "<|endoftext|>", as there);
- a tiny GPT-NeoX (Pythia's architecture) with a byte-level BPE tokenizer that, like Pythia's,
  has no pad token, and dropout switched ON in its config (the pipeline must switch it off);
- a tiny Llama sequence classifier as the gold RM, with a different, word-level tokenizer and a
  chat template, so prompt and response must be decoded and re-encoded for it;
- AlpacaFarm's alpaca_instructions folder (sft.json, unlabeled.json, preference.json, val.json:
  rows of `instruction`, `input`, `output`, some inputs of several lines) and a tiny Qwen2
  (Qwen2.5's architecture) whose tokenizer, like Qwen's, pads with its EOS and has a chat template.
"""
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForSequenceClassification, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

WORDS = ("my", "girlfriend", "boss", "dog", "apartment", "money", "friend", "told", "me", "that",
         "she", "he", "wants", "to", "move", "out", "and", "I", "don't", "know", "what", "do",
         "about", "it", "we", "have", "been", "together", "for", "two", "years", "now", "but",
         "work", "is", "hard", "lately", "so", "help", "please", "advice", "needed", "cat", "car")
SUBREDDITS = ("relationships", "personalfinance", "AskReddit", "dogs")
EOT = "<|endoftext|>"
# the gold tokenizer's chat template (jinja, as in tokenizer_config.json): BOS, then each turn as
# <|role|> content </s>
GOLD_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
                      "{{ eos_token }} {% endfor %}")


def tldr_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        post = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30)))
        title = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        summary = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        sub = rng.choice(SUBREDDITS)
        rows.append({"id": f"t3_{i:05d}", "subreddit": sub, "title": title, "post": post,
                     "summary": summary,
                     "query": f"SUBREDDIT: r/{sub}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:",
                     "reference_response": f" {summary}{EOT}"})
    return rows


def write_tldr_jsonl(path: Path, n: int = 200, seed: int = 0) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in tldr_rows(n, seed)))
    return path


def _texts(rows):
    return [r["query"] + r["reference_response"] for r in rows]


def make_policy_model(out: Path, rows: list[dict]) -> Path:
    """A tiny GPT-NeoX with a byte-level BPE trained on the rows; no pad token; dropout on."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_texts(rows), trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tokenizer) + 8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=1024, hidden_dropout=0.1,
                           attention_dropout=0.1, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.eos_token_id)
    GPTNeoXForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def make_gold_model(out: Path, rows: list[dict]) -> Path:
    """A tiny Llama reward model (one output) with a word-level tokenizer and a chat template."""
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    words = sorted({w for t in _texts(rows) for w in t.replace(EOT, " ").split()})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = GOLD_CHAT_TEMPLATE
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def make_all(root: Path, n_rows: int = 200) -> dict:
    """The three stand-ins under root; returns their paths."""
    root = Path(root)
    rows = tldr_rows(n_rows)
    return {"dataset": write_tldr_jsonl(root / "tldr.jsonl", n_rows),
            "model": make_policy_model(root / "policy", rows),
            "gold": make_gold_model(root / "gold", rows)}


# ----------------------------------------------------------------------------------------------
# AlpacaFarm
# ----------------------------------------------------------------------------------------------
ALPACA_SPLITS = {"sft": 60, "unlabeled": 40, "preference": 40, "val": 20}
QWEN_EOT = "<|endoftext|>"
QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                      "<|im_end|>\n{% endfor %}")


def alpaca_rows(n: int, seed: int) -> list[dict]:
    """Rows of AlpacaFarm's schema; every third has an empty input, some inputs span lines."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))          # noqa: E731
    rows = []
    for i in range(n):
        lines = [words(rng.randint(4, 12)) for _ in range(rng.randint(1, 4))]
        rows.append({"instruction": f"Tell me {words(rng.randint(2, 6))}.",
                     "input": "" if i % 3 == 0 else "\n".join(lines),
                     "output": words(rng.randint(3, 15))})
    return rows


def write_alpaca_folder(root: Path) -> Path:
    """alpaca_instructions/ with one JSON file per split (a JSON list, as AlpacaFarm's files)."""
    folder = Path(root) / "alpaca_instructions"
    folder.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate(ALPACA_SPLITS.items()):
        (folder / f"{split}.json").write_text(json.dumps(alpaca_rows(n, seed=k)))
    return folder


def make_qwen_policy(out: Path, rows: list[dict]) -> Path:
    """A tiny Qwen2 causal LM; its tokenizer pads with EOS (Qwen's default) and has a template."""
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts + ["INSTRUCTION: INPUT: REPLY:"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=[QWEN_EOT, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=QWEN_EOT,
                                        pad_token=QWEN_EOT)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    torch.manual_seed(2)
    config = Qwen2Config(vocab_size=len(tokenizer) + 8, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def make_alpaca(root: Path) -> dict:
    """The AlpacaFarm folder, the Qwen2 policy and a gold RM whose vocabulary covers the rows."""
    root = Path(root)
    folder = write_alpaca_folder(root)
    rows = [r for k, n in enumerate(ALPACA_SPLITS.values()) for r in alpaca_rows(n, seed=k)]
    as_tldr = [{"query": f"INSTRUCTION: {r['instruction']} INPUT: {r['input']} REPLY:",
                "reference_response": f" {r['output']}"} for r in rows]
    return {"dataset": folder, "model": make_qwen_policy(root / "qwen", rows),
            "gold": make_gold_model(root / "gold", as_tldr)}
