"""The paper's setting (PRESET=tldr / tldr_small) on local stand-ins of the same formats.

Nobody here has a GPU or the hub, so the code paths that load a hub model, a hub dataset and a
gold reward model with its own tokenizer are proven on a tiny GPT-NeoX, a TL;DR-schema JSONL and a
tiny Llama reward model with a word-level tokenizer and a chat template (tests/standins.py).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common as C
import task as T
import reward_model as RM
from conftest import BackgroundRun
import sft as SFT
import standins

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    if PIPELINE is not None:                  # the ones the preset's run was started on
        return PIPELINE.info["stand_ins"]
    return standins.make_all(tmp_path_factory.mktemp("standins"))


@pytest.fixture(scope="module")
def toy_sft_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "sft"
    SFT.main(["--out", str(out), "--num_examples", "256", "--epochs", "1", "--device", "cpu"])
    return out


def tldr_spec(paths, **overrides):
    return {"kind": "text", "dataset": str(paths["dataset"]), "prompt_field": "query",
            "response_field": "reference_response", "response_prefix": "", "max_prompt_len": 512,
            "response_len": 53, "gold_model": str(paths["gold"]), "gold_batch_size": 3, "gold_max_len": 1024,
            **overrides}


def text_task(paths, **overrides):
    return T.TextTask(tldr_spec(paths, **overrides))


def direct_gold_score(gold_dir, prompt: str, response: str) -> float:
    """The gold RM on one sequence, no padding, the chat format spelled out by hand."""
    tok = AutoTokenizer.from_pretrained(gold_dir)
    model = AutoModelForSequenceClassification.from_pretrained(gold_dir).eval()
    words = (["<s>", "<|user|>"] + prompt.split() + ["</s>", "<|assistant|>"] + response.split()
             + ["</s>"])
    ids = torch.tensor([tok.convert_tokens_to_ids(words)])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, 0].item()


# ----------------------------------------------------------------------------------------------
# Loading a pretrained policy and a dataset
# ----------------------------------------------------------------------------------------------
def test_pretrained_policy_gets_a_pad_distinct_from_eos_and_no_dropout(stand_ins):
    model, tok = C.load_pretrained_policy(str(stand_ins["model"]))
    raw = AutoTokenizer.from_pretrained(stand_ins["model"])
    assert raw.pad_token is None                      # like Pythia's tokenizer
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token_id < model.get_input_embeddings().num_embeddings
    assert model.config.hidden_dropout == 0.0 and model.config.attention_dropout == 0.0
    # dropout really off: two training-mode forwards agree
    model.train()
    ids = torch.tensor([tok("TL;DR: my dog")["input_ids"]])
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_a_checkpoint_stored_in_fp16_trains_with_fp32_master_weights(stand_ins, tmp_path):
    """Pythia's hub checkpoints are fp16 and transformers 5.x loads a checkpoint in its stored
    dtype; every loader asks for fp32, so SFT at the preset's lr 3e-6 trains instead of failing."""
    fp16 = tmp_path / "fp16"
    model = AutoModelForCausalLM.from_pretrained(stand_ins["model"], dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float16
    model.save_pretrained(fp16)
    AutoTokenizer.from_pretrained(stand_ins["model"]).save_pretrained(fp16)
    loaded, _ = C.load_pretrained_policy(str(fp16))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    out = tmp_path / "sft"
    SFT.main(["--out", str(out), "--model", str(fp16), "--dataset", str(stand_ins["dataset"]),
              "--num_examples", "32", "--batch_size", "8", "--epochs", "1", "--lr", "3e-6",
              "--device", "cpu"])
    policy, _ = C.load_policy(out, "cpu")                 # and the saved policy loads as fp32 too
    assert {p.dtype for p in policy.parameters()} == {torch.float32}


def test_jsonl_dataset_holds_out_every_tenth_row(stand_ins):
    rows = [json.loads(line) for line in Path(stand_ins["dataset"]).read_text().splitlines()]
    train, held_out = T.load_text_dataset(tldr_spec(stand_ins))
    assert held_out == rows[::10]
    assert len(train) + len(held_out) == len(rows)
    assert not {r["id"] for r in train} & {r["id"] for r in held_out}


def test_dataset_errors_name_the_problem(stand_ins, tmp_path):
    with pytest.raises(C.StageError, match="no column"):
        T.load_text_dataset(tldr_spec(stand_ins, prompt_field="prompt"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(C.StageError):
        T.load_text_dataset(tldr_spec(stand_ins, dataset=str(empty)))


def test_prompts_keep_their_end_and_responses_one_eos(stand_ins):
    _, tok = C.load_pretrained_policy(str(stand_ins["model"]))
    task = text_task(stand_ins, max_prompt_len=8)
    prompts, references = task.eval_examples(4)
    query = C.encode_prompts(tok, prompts, task.max_prompt_len)
    full = tok(prompts[0], add_special_tokens=False)["input_ids"]
    assert query.shape[1] <= 8 and query[0].tolist()[-len(full[-8:]):] == full[-8:]
    response = C.encode_responses(tok, references, task.response_len)
    assert references[0].endswith("<|endoftext|>")
    assert ((response == tok.eos_token_id).sum(dim=1) == 1).all()   # not two EOS


# ----------------------------------------------------------------------------------------------
# The gold reward model: decode, chat template, re-encode, score
# ----------------------------------------------------------------------------------------------
def test_gold_reencoding_splits_the_text_its_own_way(stand_ins):
    _, tok = C.load_pretrained_policy(str(stand_ins["model"]))
    gold = T.GoldRewardModel(str(stand_ins["gold"]), "cpu", batch_size=2)
    prompt, reference = standins.tldr_rows(1)[0]["query"], standins.tldr_rows(1)[0]["reference_response"]
    # a response as the pipeline has it: policy token ids, decoded back to text
    response_ids = C.encode_responses(tok, [reference], 53)
    text = C.decode_responses(tok, response_ids, tok.eos_token_id)[0][0]
    assert text == reference[:-len("<|endoftext|>")]
    gold_tok = AutoTokenizer.from_pretrained(stand_ins["gold"])
    expected = gold_tok.convert_tokens_to_ids(
        ["<s>", "<|user|>"] + prompt.split() + ["</s>", "<|assistant|>"] + text.split() + ["</s>"])
    assert gold.encode(prompt, text) == expected
    # the two tokenizers really split the response differently (BPE pieces vs whole words)
    policy_pieces = C.response_mask(response_ids, tok.eos_token_id).sum().item() - 1
    assert policy_pieces != len(text.split())


def test_gold_scores_batched_equal_one_at_a_time(stand_ins):
    task = text_task(stand_ins)                      # gold_batch_size 3: batches of mixed lengths
    prompts, references = task.eval_examples(7)
    responses = [r.replace("<|endoftext|>", "")[: 5 + 9 * i] for i, r in enumerate(references)]
    got = task.gold(prompts, responses, [True] * 7)
    expected = torch.tensor([direct_gold_score(stand_ins["gold"], p, r)
                             for p, r in zip(prompts, responses)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gold_score_is_read_at_the_last_token_when_pad_is_eos(stand_ins, tmp_path):
    """A gold tokenizer without a pad token gets pad = EOS, and the chat template ends in EOS: the
    library's pooling (last token that is not the pad id) would read the score before that final
    EOS. The score must be the head at the very last token of the unpadded sequence."""
    no_pad = tmp_path / "gold_no_pad"
    model = AutoModelForSequenceClassification.from_pretrained(stand_ins["gold"])
    tok = AutoTokenizer.from_pretrained(stand_ins["gold"])
    tok.pad_token = None
    model.config.pad_token_id = tok.eos_token_id          # what HF models often ship with
    model.save_pretrained(no_pad)
    tok.save_pretrained(no_pad)
    gold = T.GoldRewardModel(str(no_pad), "cpu", batch_size=4)
    prompts, references = text_task(stand_ins).eval_examples(4)
    responses = [r.replace("<|endoftext|>", "")[: 6 + 11 * i] for i, r in enumerate(references)]
    got = gold.score(prompts, responses)
    expected, pooled = [], []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([gold.encode(p, r)])
        assert ids[0, -1].item() == tok.eos_token_id      # the template's closing EOS
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state
            expected.append(model.score(hidden[0, -1]).item())
            pooled.append(model(input_ids=ids).logits[0, 0].item())
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(torch.tensor(pooled), torch.tensor(expected), atol=1e-3)


def test_gold_model_with_several_outputs_is_refused(stand_ins, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(stand_ins["gold"], num_labels=2,
                                                               ignore_mismatched_sizes=True)
    model.save_pretrained(tmp_path / "two")
    AutoTokenizer.from_pretrained(stand_ins["gold"]).save_pretrained(tmp_path / "two")
    with pytest.raises(C.StageError, match="2 outputs"):
        T.GoldRewardModel(str(tmp_path / "two"), "cpu")


# ----------------------------------------------------------------------------------------------
# Gradient accumulation: micro-batches give the whole batch's gradient
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["sft", "reward_model"])
def test_micro_batches_give_the_same_training_as_whole_batches(stage, tmp_path, toy_sft_dir):
    """Mean over the batch = sum over micro-batches of their share of it: same weights after
    training, up to float summation order (which AdamW's 1/sqrt(v) amplifies to ~1e-5 on
    parameters whose gradients are near zero; a lost micro-batch moves weights by ~lr = 1e-3)."""
    import safetensors.torch
    outs = []
    for micro in (0, 8):
        out = tmp_path / f"{stage}_{micro}"
        # in this process (not a subprocess: ~4 s of imports each); both runs seed themselves
        if stage == "sft":
            SFT.main(["--out", str(out), "--num_examples", "128", "--batch_size", "32",
                      "--epochs", "1", "--device", "cpu", "--micro_batch_size", str(micro)])
        else:
            RM.main(["--sft", str(toy_sft_dir), "--prefs", str(tmp_path / "prefs"),
                     "--out", str(out), "--num_pairs", "200", "--batch_size", "32", "--epochs", "1",
                     "--train_backbone", "1", "--device", "cpu", "--micro_batch_size", str(micro)])
        outs.append(safetensors.torch.load_file(out / "model.safetensors"))
    for name in outs[0]:
        torch.testing.assert_close(outs[0][name], outs[1][name], atol=1e-4, rtol=1e-4)


def test_train_last_blocks_fits_the_last_block_norm_and_head_only(tmp_path, toy_sft_dir):
    """--train_last_blocks 1 on the 2-block GPT-2: block 1, the final norm and the head change;
    the embeddings and block 0 keep the SFT policy's weights exactly."""
    import safetensors.torch
    out = tmp_path / "rm"
    RM.main(["--sft", str(toy_sft_dir), "--prefs", str(tmp_path / "prefs"), "--out", str(out),
             "--num_pairs", "64", "--batch_size", "32", "--epochs", "1", "--device", "cpu",
             "--train_last_blocks", "1"])
    rm = safetensors.torch.load_file(out / "model.safetensors")
    sft = safetensors.torch.load_file(toy_sft_dir / "model.safetensors")
    changed = {name for name in rm if name.startswith("transformer.")
               and not torch.equal(rm[name], sft[name])}
    assert changed and all(n.startswith(("transformer.h.1.", "transformer.ln_f.")) for n in changed)
    assert any(n.startswith("transformer.ln_f.") for n in changed)
    with pytest.raises(C.StageError, match="train_last_blocks"):
        RM.parse_args(["--sft", "s", "--prefs", "p", "--out", "o", "--train_backbone", "1",
                       "--train_last_blocks", "1"])


# ----------------------------------------------------------------------------------------------
# The whole preset, end to end, on the stand-ins at a tiny budget
# ----------------------------------------------------------------------------------------------
PIPELINE = None              # the preset's run, started by conftest.py right after collection
PIPELINE_FIXTURE = "preset"  # ... when a selected test uses this fixture


def start_pipeline(scratch: Path):
    """`PRESET=tldr_small bash run_all.sh` on fresh stand-ins, in the background (conftest.py)."""
    (scratch / "standins").mkdir(parents=True, exist_ok=True)
    paths = standins.make_all(scratch / "standins")
    run_dir = scratch / "run"
    env = {**os.environ, "PRESET": "tldr_small", "MODEL": str(paths["model"]),
           "DATASET": str(paths["dataset"]), "GOLD_MODEL": str(paths["gold"]),
           "RUN_DIR": str(run_dir), "DEVICE": "cpu", "ROUNDS": "2", "UPDATES": "2",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "ARMS": "ocrm dpo",   # the other arms run the same stages with other flags
           # the preset's flags with budgets cut to seconds (flags here override the preset's)
           "SFT_ARGS": "--num_examples 64 --batch_size 16 --micro_batch_size 8 --lr 1e-3",
           "PAIRS_ARGS": "--num_pairs 40",
           "RM_ARGS": "--batch_size 8 --micro_batch_size 4 --forward_batch_size 16",
           "EVAL_PROMPTS": "6",
           "PPO_ARGS": "--batch_size 8 --micro_batch_size 2 --eval_every 1 "
                       "--forward_batch_size 4",
           "OCRM_ARGS": "--diag_prompts 6",
           "DPO_ARGS": "--batch_size 8 --micro_batch_size 2 --eval_every 1 --forward_batch_size 4"}
    return BackgroundRun(["bash", "run_all.sh"], REPO, env, run_dir=run_dir, stand_ins=paths)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """The finished preset run: its run dir and the stand-ins it ran on."""
    pipeline = PIPELINE or start_pipeline(tmp_path_factory.mktemp("tldr_run"))
    proc = pipeline.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pipeline.info


@pytest.fixture(scope="module")
def preset_run(preset):
    return preset["run_dir"]


def test_preset_runs_end_to_end_and_writes_the_report(preset_run):
    report = json.loads((preset_run / "report.json").read_text())
    assert set(report["arms"]) == {"sft", "ocrm", "dpo"}
    task = json.loads((preset_run / "sft" / "task.json").read_text())
    assert task["kind"] == "text" and task["response_len"] == 53 and task["max_prompt_len"] == 512
    rm_args = json.loads((preset_run / "rm_1" / "rm_info.json").read_text())["args"]
    assert rm_args["train_backbone"] == 1 and rm_args["lr"] == 3e-6            # the preset's
    weights = json.loads((preset_run / "ocrm" / "weights_2" / "settings.json").read_text())
    assert weights["lam"] == 0.001 and weights["alpha"] == 0.1
    dpo_args = json.loads((preset_run / "dpo" / "dpo_info.json").read_text())["args"]
    assert dpo_args["beta"] == 0.05 and dpo_args["lr"] == 3e-6 and dpo_args["eval_prompts"] == 6
    for row in C.read_jsonl(preset_run / "ppo_1" / "metrics.jsonl"):
        assert row["gold_reward"] is None and row["tokens_per_second"] > 0   # gold only at evals


def test_preset_final_gold_is_the_gold_models_score_of_the_saved_samples(preset_run, preset):
    """Every eval prompt's response is saved (6 <= 8), so the final gold can be recomputed with
    a direct, unbatched gold forward in the chat format written out by hand."""
    stand_ins = preset["stand_ins"]
    final = json.loads((preset_run / "ocrm" / "round_2" / "final.json").read_text())
    samples = final["samples"]
    assert len(samples) == 6
    scores = [direct_gold_score(stand_ins["gold"], s["prompt"], s["response"]) for s in samples]
    assert final["gold"] == pytest.approx(sum(scores) / len(scores), abs=1e-4)
    # the headline metric: win rate against the dataset's reference responses
    _, held_out = T.load_text_dataset(tldr_spec(stand_ins))
    refs = [direct_gold_score(stand_ins["gold"], r["query"],
                              r["reference_response"].replace("<|endoftext|>", ""))
            for r in held_out[:6]]
    wins = [1.0 if s > r else 0.5 if s == r else 0.0 for s, r in zip(scores, refs)]
    assert final["win_rate_vs_reference"] == pytest.approx(sum(wins) / 6)


def test_preset_sft_checkpoint_loads_without_this_repo(preset_run):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(preset_run / "sft")
    tok = AutoTokenizer.from_pretrained(preset_run / "sft")
    assert model.config.model_type == "gpt_neox" and tok.pad_token_id != tok.eos_token_id
    # a hub model keeps the library's attention kernel (only the embedded GPT-2 asks for eager)
    assert C.load_policy(preset_run / "sft", "cpu")[0].config._attn_implementation == "sdpa"


def test_unknown_preset_is_refused():
    proc = subprocess.run(["bash", "run_all.sh"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PRESET": "tldr_large"})
    assert proc.returncode == 2 and "unknown PRESET" in proc.stderr


@pytest.mark.parametrize("which", ["model", "gold"])       # GPT-NeoX and Llama: rotary positions
def test_pair_scores_share_the_prompt_on_hub_architectures(stand_ins, which):
    """common.pair_reward_scores (prompt once, KV cache, both responses after it) equals separate
    unpadded forwards for the stand-in architectures too, not only GPT-2."""
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(stand_ins[which], num_labels=1).double()
    rm.eval()
    pad, eos, vocab = 0, 1, rm.config.vocab_size
    rm.config.pad_token_id = pad
    lengths = [5, 2, 4, 1]                                    # prompts, left-padded to 5
    prompts = [torch.randint(2, vocab, (n,)).tolist() for n in lengths]
    query = torch.tensor([[pad] * (5 - len(p)) + p for p in prompts])
    chosen = torch.randint(2, vocab, (4, 6))
    rejected = torch.randint(2, vocab, (4, 6))
    chosen[0, 2] = eos
    rejected[1, 0] = eos
    chosen[2, 5] = eos                                        # row 3 of chosen: no EOS at all
    chosen[0, 3:], rejected[1, 1:] = pad, pad
    got = C.pair_reward_scores(rm, query, chosen, rejected, pad, eos)
    for responses, scores in zip((chosen, rejected), got):
        for p, r, score in zip(prompts, responses.tolist(), scores):
            real = r[:r.index(eos) + 1] if eos in r else r
            with torch.no_grad():
                hidden = rm.base_model(input_ids=torch.tensor([p + real])).last_hidden_state
                expected = rm.score(hidden[0, -1]).item()
            assert score.item() == pytest.approx(expected, rel=1e-6, abs=1e-9)
