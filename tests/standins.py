"""Local stand-ins for the paper's setting, built offline in seconds (no hub access here).

Same formats as the real things, tiny sizes:
- a JSONL file in the schema of Huang et al.'s preprocessed TL;DR (`query` ends in "TL;DR:",
  `reference_response` starts with a space and ends in "<|endoftext|>", as there);
- a tiny GPT-NeoX (Pythia's architecture) with a byte-level BPE tokenizer that, like Pythia's,
  has no pad token, and dropout switched ON in its config (the pipeline must switch it off);
- a tiny Llama sequence classifier as the gold RM, with a different, word-level tokenizer and a
  chat template, so prompt and response must be decoded and re-encoded for it.
"""
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForSequenceClassification, PreTrainedTokenizerFast)

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
