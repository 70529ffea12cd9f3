"""Shared fixtures: the task's tokenizer and tiny random GPT-2s (a policy and a reward model).

The models are random but not near-uniform (initializer_range 0.5), so a wrong position id,
a pad that leaks into attention, or a log-prob read one position off changes the numbers by far
more than the tests' tolerances.
"""
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import common as C  # noqa: E402

torch.set_num_threads(1)          # the tests are tiny; leave the other cores alone


def tiny_config(tokenizer, **overrides) -> GPT2Config:
    """A 2-layer, 16-wide GPT-2 over the task vocabulary; dropout off, pad distinct from EOS."""
    kwargs = dict(
        vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id)
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


@pytest.fixture(scope="session")
def tokenizer():
    return C.build_tokenizer()


@pytest.fixture(scope="session")
def ids(tokenizer):
    """pad, eos and the ids of the ordinary words (`list` + the 16 items)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    words = [tokenizer.convert_tokens_to_ids(w) for w in (C.LIST,) + C.ITEMS]
    assert pad != eos and pad not in words and eos not in words
    return pad, eos, words


@pytest.fixture(scope="session")
def policy(tokenizer):
    """A random tiny causal LM in eval mode (never trained, never modified by a test)."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_config(tokenizer)).eval()


@pytest.fixture
def reward_model(tokenizer):
    """A random tiny GPT-2 with a scalar head (num_labels = 1); fresh per test (tests set its bias)."""
    torch.manual_seed(1)
    return GPT2ForSequenceClassification(tiny_config(tokenizer, num_labels=1)).eval()
