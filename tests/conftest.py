"""Shared fixtures: the task's tokenizer and tiny random GPT-2s (a policy and a reward model),
and the early start of the suite's two whole-pipeline runs.

The models are random but not near-uniform (initializer_range 0.5), so a wrong position id,
a pad that leaks into attention, or a log-prob read one position off changes the numbers by far
more than the tests' tolerances.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import common as C  # noqa: E402
import task as T  # noqa: E402

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
    return T.build_tokenizer()


@pytest.fixture(scope="session")
def ids(tokenizer):
    """pad, eos and the ids of the ordinary words (`list` + the 16 items)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    words = [tokenizer.convert_tokens_to_ids(w) for w in (T.LIST,) + T.ITEMS]
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


# ----------------------------------------------------------------------------------------------
# The whole-pipeline runs, started as soon as the tests are collected
# ----------------------------------------------------------------------------------------------
# tests/test_pipeline.py and tests/test_tldr_preset.py each need one `bash run_all.sh` (35-40 s
# of one core, mostly the start-up of ten Python processes). Run in turn when their modules reach
# them, they were over a third of the suite's time. A module that defines
#   start_pipeline(scratch: Path) -> BackgroundRun   and   PIPELINE_FIXTURE = "<fixture name>"
# has start_pipeline called here, right after collection, when a selected test uses that fixture;
# the runs then share the two cores with the in-process tests (test_bandit, test_math, ...)
# instead of waiting for their turn. The module keeps the handle in its global PIPELINE and the
# fixture collects the result with PIPELINE.result(). If starting fails here, PIPELINE stays None
# and the fixture starts the run itself, so the error is reported by the tests that need it.
class BackgroundRun:
    """A command running in a subprocess from now on; .result() waits and returns it completed."""

    def __init__(self, cmd, cwd, env, **info):
        self.cmd = [str(c) for c in cmd]
        self.info = info                              # whatever the module wants back later
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        # a session of its own: stop() kills bash and the stage it is running, together
        self._proc = subprocess.Popen(self.cmd, cwd=cwd, env=env, stdout=self._out,
                                      stderr=self._err, text=True, start_new_session=True)

    def result(self, timeout: float = 600) -> subprocess.CompletedProcess:
        try:
            returncode = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{' '.join(self.cmd)} still running after {timeout}s")
        streams = []
        for f in (self._out, self._err):
            f.seek(0)
            streams.append(f.read())
        return subprocess.CompletedProcess(self.cmd, returncode, *streams)

    def stop(self) -> None:
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)   # no-op error once the group is gone
        except ProcessLookupError:
            pass
        self._proc.wait()


_scratch: list[Path] = []
_started: list[BackgroundRun] = []


def pytest_collection_finish(session):
    if session.config.option.collectonly or session.testsfailed:   # nothing will run
        return
    by_module = {}
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and getattr(module, "PIPELINE_FIXTURE", None) in item.fixturenames:
            by_module[module.__name__] = module
    for name, module in sorted(by_module.items()):
        scratch = Path(tempfile.mkdtemp(prefix=f"ocrm-{name}-"))
        _scratch.append(scratch)
        try:
            module.PIPELINE = module.start_pipeline(scratch)
        except Exception:                             # the fixture will try again, and report it
            continue
        _started.append(module.PIPELINE)
    # A test whose long subprocess work needs nothing from the other tests (the kill-and-resume
    # test) can start it here too: its module lists it in BACKGROUND_TESTS {test name: starter},
    # the starter returns an object with .result() and .stop(), kept in module.BACKGROUND.
    for item in session.items:
        module = getattr(item, "module", None)
        starter = getattr(module, "BACKGROUND_TESTS", {}).get(item.originalname)
        if starter is not None and item.originalname not in module.BACKGROUND:
            scratch = Path(tempfile.mkdtemp(prefix=f"ocrm-{item.originalname}-"))
            _scratch.append(scratch)
            module.BACKGROUND[item.originalname] = starter(scratch)
            _started.append(module.BACKGROUND[item.originalname])


def pytest_sessionfinish(session, exitstatus):
    for run in _started:                              # e.g. its module's tests were skipped by -x
        run.stop()
    if exitstatus == 0:                               # after a failure, keep the runs to look at
        for scratch in _scratch:
            shutil.rmtree(scratch, ignore_errors=True)
