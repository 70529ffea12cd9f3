"""The paper's second setting (PRESET=alpaca: AlpacaFarm instructions, Qwen2.5) and PRESET=smoke, on
local stand-ins of the same formats (tests/standins.py): the authors' prompt template with its
input truncated at newlines, a folder of split files, a Qwen2 tokenizer that pads with its EOS,
and the whole preset end to end at a tiny budget.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import common as C
import task as T
from conftest import BackgroundRun
import standins

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = "INSTRUCTION: {instruction} \n\nINPUT: {input}\n\nREPLY:"


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory):
    if PIPELINE is not None:                  # the stand-ins the preset's run was started on
        return PIPELINE.info["stand_ins"]
    return standins.make_alpaca(tmp_path_factory.mktemp("alpaca"))


def spec(paths, **overrides):
    return {"kind": "text", "dataset": str(paths["dataset"]), "dataset_config": None,
            "train_splits": ["sft", "unlabeled", "preference"], "held_out_split": "val",
            "prompt_field": None, "prompt_template": TEMPLATE, "truncate_field": "input",
            "response_field": "output", "response_prefix": " ", "max_prompt_len": 512,
            "response_len": 106, "gold_model": str(paths["gold"]), "gold_batch_size": 4,
            "gold_max_len": 1024, **overrides}


# ----------------------------------------------------------------------------------------------
# Data: the split files, the template, the truncation
# ----------------------------------------------------------------------------------------------
def test_train_rows_are_the_three_training_splits_and_val_is_held_out(alpaca):
    train, held_out = T.load_text_dataset(spec(alpaca))
    files = {s: json.loads((alpaca["dataset"] / f"{s}.json").read_text())
             for s in standins.ALPACA_SPLITS}
    assert train == files["sft"] + files["unlabeled"] + files["preference"]
    assert held_out == files["val"]
    with pytest.raises(C.StageError, match="no file for the split"):
        T.load_text_dataset(spec(alpaca, held_out_split="test"))
    with pytest.raises(C.StageError, match="no column"):
        T.load_text_dataset(spec(alpaca, prompt_template="{instruction} {context}"))


def test_prompts_follow_the_template_and_references_start_with_a_space(alpaca):
    task = T.TextTask(spec(alpaca))                   # no tokenizer: nothing is truncated
    row = json.loads((alpaca["dataset"] / "val.json").read_text())[1]
    prompts, references = task.eval_examples(2)
    assert prompts[1] == (f"INSTRUCTION: {row['instruction']} \n\nINPUT: {row['input']}\n\n"
                          f"REPLY:")
    assert references[1] == " " + row["output"]


def test_a_long_input_is_cut_at_its_last_newlines_until_the_prompt_fits(alpaca):
    _, tokenizer = C.load_pretrained_policy(str(alpaca["model"]))
    row = {"instruction": "Tell me my dog.",
           "input": "my dog is hard\nwe have been together\nfor two years now but\nwork is hard",
           "output": "help"}
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    full = TEMPLATE.format(**row)
    # a limit that the prompt with the first two input lines meets and with three does not
    two = TEMPLATE.format(instruction=row["instruction"],
                          input="my dog is hard\nwe have been together")
    three = TEMPLATE.format(instruction=row["instruction"],
                            input="my dog is hard\nwe have been together\nfor two years now but")
    assert count(two) < count(three) < count(full)
    s = spec(alpaca, max_prompt_len=count(two))
    assert T.format_prompt(row, s, tokenizer) == two
    ids = C.encode_prompts(tokenizer, [two], count(two))[0].tolist()
    assert ids == tokenizer(two, add_special_tokens=False)["input_ids"]   # fits: nothing cut
    assert T.format_prompt(row, spec(alpaca, max_prompt_len=count(full)), tokenizer) == full
    # with no newline left the input loses the tokens it is over by; "REPLY:" always stays
    one_line = {**row, "input": "my dog is hard and we have been together for two years"}
    limit = count(TEMPLATE.format(instruction=row["instruction"], input="my dog")) + 1
    cut = T.format_prompt(one_line, spec(alpaca, max_prompt_len=limit), tokenizer)
    assert count(cut) <= limit and cut.endswith("\n\nREPLY:") and "INPUT: my dog" in cut


def test_qwen_pads_with_its_eos_so_the_policy_gets_a_pad_of_its_own(alpaca):
    from transformers import AutoTokenizer
    raw = AutoTokenizer.from_pretrained(alpaca["model"])
    assert raw.pad_token_id == raw.eos_token_id                       # as Qwen2.5 ships
    model, tok = C.load_pretrained_policy(str(alpaca["model"]))
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token_id < model.get_input_embeddings().num_embeddings
    assert model.config.pad_token_id == tok.pad_token_id


# ----------------------------------------------------------------------------------------------
# PRESET=alpaca end to end on the stand-ins; PRESET=smoke's budget
# ----------------------------------------------------------------------------------------------
PIPELINE = None              # the preset's run, started by conftest.py right after collection
PIPELINE_FIXTURE = "alpaca_run"


def start_pipeline(scratch: Path):
    paths = standins.make_alpaca(scratch / "standins")
    run_dir = scratch / "run"
    env = {**os.environ, "PRESET": "alpaca", "MODEL": str(paths["model"]),
           "DATASET": str(paths["dataset"]), "GOLD_MODEL": str(paths["gold"]),
           "RUN_DIR": str(run_dir), "DEVICE": "cpu", "ROUNDS": "2", "UPDATES": "1",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "ARMS": "ocrm",
           # the preset's flags with budgets cut to seconds (flags here override the preset's)
           "SFT_ARGS": "--num_examples 32 --batch_size 16 --micro_batch_size 8 --lr 1e-3 "
                       "--max_prompt_len 40 --response_len 12",
           "PAIRS_ARGS": "--num_pairs 24",
           "RM_ARGS": "--batch_size 8 --micro_batch_size 4 --forward_batch_size 16",
           "EVAL_PROMPTS": "4",
           "PPO_ARGS": "--batch_size 8 --micro_batch_size 4 --eval_every 1 "
                       "--forward_batch_size 4",
           "OCRM_ARGS": "--diag_prompts 4"}
    return BackgroundRun(["bash", "run_all.sh"], REPO, env, run_dir=run_dir, stand_ins=paths)


@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory):
    pipeline = PIPELINE or start_pipeline(tmp_path_factory.mktemp("alpaca_run"))
    proc = pipeline.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pipeline.info["run_dir"], proc.stdout


def test_alpaca_preset_runs_end_to_end_with_the_authors_settings(alpaca_run):
    run_dir, stdout = alpaca_run
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["arms"]) == {"sft", "ocrm"}
    task = json.loads((run_dir / "sft" / "task.json").read_text())
    assert task["prompt_template"] == TEMPLATE and task["truncate_field"] == "input"
    assert (task["train_splits"], task["held_out_split"]) == (["sft", "unlabeled", "preference"],
                                                             "val")
    assert task["response_prefix"] == " " and task["response_field"] == "output"
    ppo_args = json.loads((run_dir / "ppo_1" / "ppo_info.json").read_text())["args"]
    assert (ppo_args["beta"], ppo_args["lr"]) == (0.1, 3e-6)             # the authors' Alpaca
    final = json.loads((run_dir / "ppo_1" / "final.json").read_text())
    assert final["samples"][0]["prompt"].startswith("INSTRUCTION: ")
    # every stage reports its throughput (and, on a GPU, its peak memory)
    for info in ("sft/sft_info.json", "rm_1/rm_info.json", "ppo_1/ppo_info.json",
                 "ocrm/rm_2/rm_info.json"):
        data = json.loads((run_dir / info).read_text())
        assert data["tokens_per_second"] > 0 and data["peak_gpu_memory_gb"] is None, info
    assert stdout.count("tokens/s") >= 5


def test_smoke_preset_is_the_authors_debug_budget(tmp_path):
    """PRESET=smoke's flags (a stand-in PYTHON records the calls; no model runs)."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PRESET": "smoke", "PYTHON": str(fake), "CALLS": str(tmp_path / "log"),
           "RUN_DIR": str(tmp_path / "run"), "ROUNDS": "2"}
    proc = subprocess.run(["bash", "run_all.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "log").read_text().splitlines()
    assert "--model EleutherAI/pythia-14m" in log[0] and "--num_examples 2048" in log[0]
    assert "--num_pairs 512" in log[1]
    assert all("--updates 1" in c for c in log if c.startswith("ppo.py"))
