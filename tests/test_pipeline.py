"""The whole pipeline on a tiny budget: the run-directory contract, resuming (also after a
SIGKILL), determinism, one-line errors for bad inputs and for NaN/inf, and safe loading.

One module-scoped run of `run_all.sh` (2 rounds, 2 PPO updates of 8 episodes per round) is
shared by every test here; it takes about a minute on a free CPU core. It is also the reference
that a second run, killed four times and resumed, must reproduce (about one more minute). Run with

    python -m pytest tests/test_pipeline.py -q

Every subprocess gets OMP_NUM_THREADS=1: the runs are tiny, and two torch thread pools fighting
over a shared 2-core machine make PPO ~10x slower. The runs are deterministic under that setting
(CPU, one thread), which several tests below rely on.

The bad-input and numerical-fault cases fail in a fraction of a second once torch and
transformers are imported, but a fresh interpreter spends ~5 s importing them. So most of those
cases run each stage script in a forked copy of this (already importing) test process, via
`runpy`, and read the forked process's real exit code, stdout and stderr; an uncaught exception
there prints its traceback to stderr and exits 1, as the interpreter would. Commands spelled with
sys.executable or bash run as ordinary subprocesses.
"""
import json
import math
import multiprocessing
import os
import re
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common as C
import probe_rm
import task as T
from conftest import BackgroundRun
from test_math import brute_force_logprobs, brute_force_policy_pair_accuracy

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BASE_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}

# The tiny budget of the shared run (run_all.sh's environment variables)
UPDATES, BATCH_SIZE, ROUNDS, EVAL_PROMPTS, NUM_PAIRS = 2, 8, 2, 32, 128
PIPELINE_ENV = {
    "SEED": "1", "ROUNDS": str(ROUNDS), "UPDATES": str(UPDATES), "PYTHON": PY, "DEVICE": "cpu",
    "ARM_JOBS": "1",      # the arms one after another: their stage lines on stdout, in order
    "SFT_ARGS": "--num_examples 256 --epochs 1",
    "PAIRS_ARGS": f"--num_pairs {NUM_PAIRS}",
    "RM_ARGS": "--epochs 1",
    "EVAL_PROMPTS": str(EVAL_PROMPTS),
    "PPO_ARGS": f"--eval_every 1 --batch_size {BATCH_SIZE}",
}
# Stage output directories, in the order run_all.sh makes them
STAGES = ["sft", "rm_1", "ppo_1", "standard_rlhf/round_2", "ppo_new_kl/round_2", "ocrm/rm_2",
          "ocrm/round_2", "dpo", "wpo"]
PPO_DIRS = ["ppo_1", "standard_rlhf/round_2", "ppo_new_kl/round_2", "ocrm/round_2"]
POLICY_DIRS = ["sft"] + PPO_DIRS + ["dpo", "wpo"]
RM_DIRS = ["rm_1", "ocrm/rm_2"]
PREF_COLUMNS = ["prompt", "chosen", "rejected", "gold_chosen", "gold_rejected",
                "logp_sft_chosen", "logp_sft_rejected"]
METRIC_KEYS = ["update", "episodes", "kl_to_ref", "kl_to_sft", "proxy_reward", "gold_reward",
               "response_length", "no_eos_fraction", "entropy", "policy_loss", "value_loss",
               "clipfrac", "approx_kl", "lr", "episodes_per_second", "tokens_per_second"]
TIMINGS = ("episodes_per_second", "tokens_per_second")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# Running things
# ----------------------------------------------------------------------------------------------
LIVE: set = set()   # the subprocesses running now (each in a session of its own): InThread.stop


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:                    # already gone
        pass


def run_command(cmd, env=None, timeout=300) -> subprocess.CompletedProcess:
    """An ordinary subprocess in the repo root, output captured. It runs in a session of its
    own, so that a timeout, an interrupted test session or InThread.stop() kills it together
    with the stage it is running."""
    env = {**BASE_ENV, **{k: str(v) for k, v in (env or {}).items()}}
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    LIVE.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:                   # a timeout, or the session is ending
            kill_group(proc)
            proc.communicate()
        LIVE.discard(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def pipeline_env(run_dir: Path, **extra) -> dict:
    """The environment of every run_all.sh call here: the tiny budget into run_dir."""
    return {**BASE_ENV, **PIPELINE_ENV, "RUN_DIR": str(run_dir), **extra}


def run_all(run_dir: Path, **env) -> subprocess.CompletedProcess:
    return run_command(["bash", "run_all.sh"], env=pipeline_env(run_dir, **env), timeout=600)


def _stage_in_child(script, argv, stdout_path, stderr_path):
    """Body of the forked process: run `script` as __main__ with its output sent to two files."""
    os.chdir(ROOT)
    for fd, path, name in ((1, stdout_path, "stdout"), (2, stderr_path, "stderr")):
        stream = open(path, "w")
        os.dup2(stream.fileno(), fd)
        setattr(sys, name, stream)
    sys.argv = [script, *argv]
    runpy.run_path(str(ROOT / script), run_name="__main__")


def run_forked(cmd, scratch: Path, timeout=120) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS...` in a forked copy of this process (see the module docstring)."""
    script, *argv = [str(c) for c in cmd]
    scratch.mkdir(parents=True, exist_ok=True)
    out, err = scratch / "stdout", scratch / "stderr"
    child = multiprocessing.get_context("fork").Process(
        target=_stage_in_child, args=(script, argv, out, err))
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"{' '.join(cmd)} still running after {timeout}s")
    return subprocess.CompletedProcess(cmd, child.exitcode, out.read_text(), err.read_text())


def without(row: dict, *keys) -> dict:
    return {k: v for k, v in row.items() if k not in keys}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_argv(info_file: Path, out: Path) -> list[str]:
    """The exact flags a finished stage ran with (its *_info.json), with a different --out
    (a flag left at None, such as sft.py's --model for the embedded task, is left out)."""
    args = json.loads(info_file.read_text())["args"]
    return [f"--{k}={out if k == 'out' else v}" for k, v in args.items() if v is not None]


def file_mtimes(run_dir: Path, skip=("report.json", "report.md", "curves.png")) -> dict:
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and p.name not in skip}


PIPELINE = None           # the shared run, started by conftest.py right after collection
PIPELINE_FIXTURE = "run"  # ... when a selected test uses this fixture


def start_pipeline(scratch: Path):
    """The whole pipeline once, on the tiny budget, in the background (see conftest.py)."""
    run_dir = scratch / "run"
    return BackgroundRun(["bash", "run_all.sh"], ROOT, pipeline_env(run_dir), run_dir=run_dir)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The shared run, finished; the report as it was right after the run."""
    pipeline = PIPELINE or start_pipeline(tmp_path_factory.mktemp("pipeline"))
    proc, run_dir = pipeline.result(), pipeline.info["run_dir"]
    assert proc.returncode == 0, f"run_all.sh failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return SimpleNamespace(dir=run_dir, stdout=proc.stdout,
                           report=json.loads((run_dir / "report.json").read_text()))


# ----------------------------------------------------------------------------------------------
# 1. The run-directory contract
# ----------------------------------------------------------------------------------------------
def test_checkpoints_load_with_plain_transformers(run):
    """sft/, rm_k/ and every PPO dir are Hugging Face safetensors directories that the Auto
    classes load without this repo; they all share one tokenizer."""
    vocab = None
    for name, auto in [(d, AutoModelForCausalLM) for d in POLICY_DIRS] + \
                      [(d, AutoModelForSequenceClassification) for d in RM_DIRS]:
        path = run.dir / name
        assert (path / "model.safetensors").is_file(), name
        assert not (path / "pytorch_model.bin").exists(), name
        model = auto.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        vocab = vocab or tokenizer.get_vocab()
        assert tokenizer.get_vocab() == vocab, f"{name} has a different vocabulary"
        assert tokenizer.pad_token_id != tokenizer.eos_token_id
        ids = tokenizer("list red blue", return_tensors="pt")["input_ids"]
        assert ids.shape == (1, 3) and tokenizer.unk_token_id not in ids
        with torch.no_grad():
            out = model(input_ids=ids).logits
        if auto is AutoModelForCausalLM:
            assert out.shape == (1, 3, len(vocab))
        else:   # a scalar head, and the centring bias the stages subtract
            assert out.shape == (1, 1) and model.config.num_labels == 1
            assert math.isfinite(model.config.reward_bias)
        # the embedded model's attention choice (common.ATTENTION_KEY) survives every save
        load = C.load_policy if auto is AutoModelForCausalLM else C.load_reward_model
        assert load(path, "cpu")[0].config._attn_implementation == "eager", name


def test_preference_pairs_are_well_formed(run):
    prefs = datasets.load_from_disk(str(run.dir / "prefs"))
    assert set(PREF_COLUMNS) <= set(prefs.column_names)
    assert len(prefs) == NUM_PAIRS
    for col in ("logp_sft_chosen", "logp_sft_rejected"):
        assert all(math.isfinite(x) and x <= 0 for x in prefs[col]), col
    # --label argmax: the chosen response never has the lower gold score (ties: a coin)
    assert all(c >= r for c, r in zip(prefs["gold_chosen"], prefs["gold_rejected"]))


def log_relative_ratio(logp_policy, logp_sft, alpha):
    """log r_a = log( p_k / (a p_k + (1 - a) p_sft) ), plain float64 math (moderate log-probs)."""
    p_k, p_sft = math.exp(logp_policy), math.exp(logp_sft)
    return math.log(p_k / (alpha * p_k + (1 - alpha) * p_sft))


def test_ocrm_weights_are_the_tempered_product_of_both_ratios(run):
    """weight = exp(lam (log r_a(y_c) + log r_a(y_r))), recomputed from the stored log-probs."""
    weights_dir = run.dir / "ocrm" / "weights_2"
    data = datasets.load_from_disk(str(weights_dir))
    prefs = datasets.load_from_disk(str(run.dir / "prefs"))
    assert set(PREF_COLUMNS + ["logp_policy_chosen", "logp_policy_rejected", "weight"]) \
        <= set(data.column_names)
    for col in PREF_COLUMNS:                     # the same pairs, in the same order
        assert data[col] == prefs[col], col
    settings = json.loads((weights_dir / "settings.json").read_text())
    assert {"alpha", "lam", "min_ess", "normalize", "clip"} <= set(settings)
    alpha, lam = settings["alpha"], settings["diagnostics"]["lam_used"]
    assert lam == settings["lam"] or settings["min_ess"] > 0     # lowered only by the ESS floor

    stored = data["weight"]
    assert all(math.isfinite(w) and w > 0 for w in stored)
    expected = [math.exp(lam * (log_relative_ratio(pc, sc, alpha)
                                + log_relative_ratio(pr, sr, alpha)))
                for pc, pr, sc, sr in zip(data["logp_policy_chosen"], data["logp_policy_rejected"],
                                          data["logp_sft_chosen"], data["logp_sft_rejected"])]
    if settings["normalize"]:
        mean = sum(expected) / len(expected)
        expected = [w / mean for w in expected]
    if settings["clip"] > 0:
        expected = [min(w, settings["clip"]) for w in expected]
    for i, (got, want) in enumerate(zip(stored, expected)):
        assert got == pytest.approx(want, rel=1e-9), f"pair {i}"

    # the report's weight diagnostics describe exactly these weights
    n = len(stored)
    ess = sum(stored) ** 2 / sum(w * w for w in stored) / n
    (row,) = run.report["weights"]
    assert row["ess_fraction"] == pytest.approx(ess, rel=1e-9)
    assert (row["min"], row["max"]) == (min(stored), max(stored))
    assert row["mean"] == pytest.approx(sum(stored) / n, rel=1e-9)


def test_probe_rm_prints_one_line_per_reward_model_and_the_gold_ceiling(run, capsys):
    probe_rm.main(["--sft", str(run.dir / "sft"), "--reward_model", "gold", str(run.dir / "rm_1"),
                   "--num_prompts", "16"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("gold: ")
    # the gold's favourite is the best answer of each prompt (task.best_gold, another computation)
    favourite, best = re.search(r"favourite gold (-?[\d.]+) \(best (-?[\d.]+)\)", lines[0]).groups()
    assert favourite == best
    assert lines[1].startswith(f"{run.dir / 'rm_1'}: favourite gold ")
    assert all(f"{x} over {y} " in lines[1] for x, y in probe_rm.COMPARISONS)
    with pytest.raises(C.StageError, match="not a reward model"):
        probe_rm.main(["--sft", str(run.dir / "sft"), "--reward_model", str(run.dir / "ppo_1")])


def test_fresh_pairs_control_fits_on_new_labelled_samples_of_the_policy(run, tmp_path):
    """ocrm_correct.py --fresh_pairs N: N new pairs sampled from pi_k (log-probs under pi_k, gold
    labels), all weights 1, instead of the re-weighted stored pairs."""
    out = tmp_path / "rm"
    proc = run_command([PY, "ocrm_correct.py", "--policy", run.dir / "ppo_1", "--sft", run.dir / "sft",
                        "--weights_out", tmp_path / "w", "--out", out, "--fresh_pairs", 48,
                        "--epochs", 1, "--seed", 3, "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = datasets.load_from_disk(str(tmp_path / "w"))
    settings = json.loads((tmp_path / "w" / "settings.json").read_text())
    assert len(data) == 48 and set(data["weight"]) == {1.0}
    assert settings["fresh_pairs"] == 48 and settings["diagnostics"]["ess_fraction"] == 1.0
    assert (settings["seed"], settings["label"]) == (3, "argmax")     # what the pairs depend on
    rm_info = json.loads((out / "rm_info.json").read_text())
    assert rm_info["num_pairs"] == 48 and not rm_info["weighted"]
    assert data["prompt"] == T.load_task(run.dir / "sft").pair_prompts(48, seed=3)
    stored = datasets.load_from_disk(str(run.dir / "prefs"))
    assert data["chosen_ids"] != stored["chosen_ids"][:48]            # new samples, not the old
    policy, tokenizer = C.load_policy(run.dir / "ppo_1", "cpu")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for row in data.select(range(6)):
        prompt = [t for t in row["prompt_ids"] if t != pad]
        for side in ("chosen", "rejected"):
            # log-probs under pi_k (the sampler), recomputed one token at a time
            expected = sum(brute_force_logprobs(policy, prompt, row[f"{side}_ids"], eos, 1.0))
            assert row[f"logp_policy_{side}"] == pytest.approx(expected, abs=1e-4)
            assert row[f"logp_sft_{side}"] == row[f"logp_policy_{side}"]
            text, ended = C.decode_responses(tokenizer, torch.tensor([row[f"{side}_ids"]]), eos)
            # the columns are float32: the gold value (a sum of item values) up to float32 rounding
            gold = T.load_task(run.dir / "sft").gold_reward(row["prompt"], text[0], ended[0])
            assert row[f"gold_{side}"] == pytest.approx(gold, abs=1e-6)
        assert row["gold_chosen"] >= row["gold_rejected"]


def test_fresh_plus_stored_control_fits_on_the_stored_pairs_then_new_ones(run, tmp_path):
    """ocrm_correct.py --fresh_pairs N --prefs P: the stored pairs, unchanged and in order, then
    N new pairs of pi_k, all of weight 1; the stored rows carry their l_k under pi_k, the same
    numbers as OCRM's own weights for that policy (the run's ocrm/weights_2, made from ppo_1)."""
    import ocrm_correct
    ocrm_correct.main(["--policy", str(run.dir / "ppo_1"), "--sft", str(run.dir / "sft"),
                       "--prefs", str(run.dir / "prefs"), "--weights_out", str(tmp_path / "w"),
                       "--out", str(tmp_path / "rm"), "--fresh_pairs", "48", "--epochs", "1",
                       "--seed", "3", "--device", "cpu"])
    data = datasets.load_from_disk(str(tmp_path / "w"))
    stored = datasets.load_from_disk(str(run.dir / "prefs"))
    ocrm_weights = datasets.load_from_disk(str(run.dir / "ocrm" / "weights_2"))
    assert len(data) == NUM_PAIRS + 48 and set(data["weight"]) == {1.0}
    assert json.loads((tmp_path / "rm" / "rm_info.json").read_text())["num_pairs"] == NUM_PAIRS + 48
    old, new = data.select(range(NUM_PAIRS)), data.select(range(NUM_PAIRS, NUM_PAIRS + 48))
    pad = C.load_tokenizer(run.dir / "sft").pad_token_id
    for column in PREF_COLUMNS + ["chosen_ids", "rejected_ids"]:
        assert list(old[column]) == list(stored[column]), column
    strip = lambda rows: [[t for t in ids if t != pad] for ids in rows]   # noqa: E731
    assert strip(old["prompt_ids"]) == strip(stored["prompt_ids"])
    assert len({len(ids) for ids in data["prompt_ids"]}) == 1             # one padded width
    for side in ("chosen", "rejected"):
        assert list(old[f"logp_policy_{side}"]) == pytest.approx(
            list(ocrm_weights[f"logp_policy_{side}"]), abs=1e-5)
        # the new rows were sampled by pi_k: their l_k is their logp_sft_* column
        assert list(new[f"logp_policy_{side}"]) == list(new[f"logp_sft_{side}"])
    assert new["prompt"] == T.load_task(run.dir / "sft").pair_prompts(48, seed=3)
    assert strip(new["chosen_ids"]) != strip(stored["chosen_ids"][:48])   # new samples


def test_dpo_first_step_is_log_2_times_the_mean_weight_and_wpo_0_weights_1(run):
    """At the first step the policy is its reference, so every pair's loss is log 2 and the batch
    loss is log 2 times the mean weight: exactly log 2 for --wpo 0 (w = 1), less for --wpo 1."""
    dpo = C.read_jsonl(run.dir / "dpo" / "metrics.jsonl")[0]
    wpo = C.read_jsonl(run.dir / "wpo" / "metrics.jsonl")[0]
    assert dpo["weight"] == 1.0 and dpo["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert 0.0 < wpo["weight"] < 1.0
    assert wpo["loss"] == pytest.approx(wpo["weight"] * math.log(2), abs=1e-6)


def test_report_has_every_arm_curve_weight_and_timing(run):
    report = run.report
    assert report["seed"] == 1
    assert set(report["arms"]) == {"sft", "standard_rlhf", "ppo_new_kl", "ocrm", "dpo", "wpo"}
    # each round adds UPDATES evaluation points, one per update (--eval_every 1); DPO/WPO make one
    # step of 64 pairs (116 training pairs) and are evaluated before and after it
    rounds_curve = [u * BATCH_SIZE for u in range(UPDATES * ROUNDS + 1)]
    offline_curve = [0, 64]
    for arm, r in report["arms"].items():
        for key in ("gold", "gold_se", "proxy", "kl_to_sft", "win_rate_vs_sft",
                    "win_rate_vs_reference"):
            assert math.isfinite(r[key]), (arm, key)
        assert 0.0 <= r["win_rate_vs_sft"] <= 1.0 and 0.0 <= r["win_rate_vs_reference"] <= 1.0
        episodes = [p["episodes"] for p in r["curve"]]
        assert all(set(p) == {"episodes", "kl_to_sft", "proxy", "gold", "gold_se"}
                   for p in r["curve"])
        assert all(a < b for a, b in zip(episodes, episodes[1:])), (arm, episodes)
        assert episodes == {"sft": [0], "dpo": offline_curve,
                            "wpo": offline_curve}.get(arm, rounds_curve), arm
        if arm in ("dpo", "wpo"):
            final = json.loads((run.dir / arm / "final.json").read_text())
            assert [r[k] for k in ("gold", "proxy", "kl_to_sft", "win_rate_vs_reference")] == \
                [final[k] for k in ("gold", "proxy", "kl_to_sft", "win_rate_vs_reference")]
            assert 0.0 <= final["heldout_preference_accuracy"] <= 1.0
            assert [f["gold"] for f in r["stage_finals"]] == [final["gold"]]
        elif arm != "sft":   # the final numbers are those of the arm's last round
            final = json.loads((run.dir / arm / f"round_{ROUNDS}" / "final.json").read_text())
            keys = ("gold", "proxy", "win_rate_vs_sft", "win_rate_vs_reference")
            assert [r[k] for k in keys] == [final[k] for k in keys]
            # each round's final gold, round 1 being the shared ppo_1
            stages = [run.dir / "ppo_1"] + [run.dir / arm / f"round_{k}"
                                             for k in range(2, ROUNDS + 1)]
            assert [f["gold"] for f in r["stage_finals"]] == \
                [json.loads((d / "final.json").read_text())["gold"] for d in stages]
        else:   # the SFT policy's numbers, evaluated in ppo_1 on the same prompts
            first = json.loads((run.dir / "ppo_1" / "final.json").read_text())["sft"]
            assert (r["gold"], r["win_rate_vs_reference"]) == \
                (first["gold"], first["win_rate_vs_reference"])

    assert [w["round"] for w in report["weights"]] == list(range(2, ROUNDS + 1))
    for w in report["weights"]:
        assert 0.0 < w["ess_fraction"] <= 1.0
        assert 0.0 < w["min"] <= w["mean"] <= w["max"]

    seconds = report["seconds"]
    assert set(seconds) == set(STAGES) | {"total"}
    assert all(v >= 0 for v in seconds.values())
    assert seconds["total"] == pytest.approx(sum(v for k, v in seconds.items() if k != "total"),
                                             abs=0.1 * len(STAGES))

    assert (run.dir / "report.md").read_text().startswith("# OCRM run")
    assert (run.dir / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_final_gold_is_kept_per_prompt_and_gives_the_held_out_noise(run):
    """final.json keeps each held-out prompt's gold, in eval order: its mean is `gold`, its s.e.
    `gold_se`; the report's held-out noise is the s.e. over prompts of OCRM minus each control,
    prompt by prompt (recomputed here with the statistics module)."""
    def std_err(xs):
        return statistics.stdev(xs) / math.sqrt(len(xs))

    per_prompt = {}
    for d in PPO_DIRS:
        final = json.loads((run.dir / d / "final.json").read_text())
        gold = final["gold_per_prompt"]
        assert len(gold) == EVAL_PROMPTS, d
        assert final["gold"] == pytest.approx(statistics.mean(gold), abs=1e-6), d
        assert final["gold_se"] == pytest.approx(std_err(gold), rel=1e-9), d
        assert math.isfinite(final["sft"]["gold_se"])
        checked = 0
        for i, sample in enumerate(final["samples"]):   # the first 8 prompts, with their texts
            if gold[i] != T.NO_EOS_GOLD:
                assert gold[i] == T.load_task(run.dir / "sft").gold_reward(sample["prompt"], sample["response"]), (d, i)
                checked += 1
        assert checked > 0, f"{d}: no sample ended, so the order of gold_per_prompt went unchecked"
        per_prompt[d.split("/")[0]] = gold
    for control in ("standard_rlhf", "ppo_new_kl"):
        diffs = [a - b for a, b in zip(per_prompt["ocrm"], per_prompt[control])]
        assert run.report["held_out_noise"][f"ocrm_minus_{control}"] == \
            pytest.approx(std_err(diffs), rel=1e-9)
    assert run.report["arms"]["ocrm"]["gold_se"] == pytest.approx(std_err(per_prompt["ocrm"]))


def test_report_has_policy_pair_accuracy_before_and_after_each_correction(run):
    """Each OCRM round reports how RM_{k-1} and the corrected RM_k rank fresh pairs from pi_{k-1};
    round 2's `before` (RM_1 on pi_1) is recomputed with the per-prompt loop of test_math."""
    for w in run.report["weights"]:
        acc = w["policy_pair_accuracy"]
        assert set(acc) == {"num_untied_pairs", "before", "after"}, w["round"]
        assert isinstance(acc["num_untied_pairs"], int) and acc["num_untied_pairs"] > 0
        assert all(isinstance(acc[k], float) and 0.0 <= acc[k] <= 1.0 for k in ("before", "after"))
        rm_info = json.loads((run.dir / "ocrm" / f"rm_{w['round']}" / "rm_info.json").read_text())
        assert rm_info["policy_pair_accuracy"] == acc, w["round"]

    rm_info = json.loads((run.dir / "ocrm" / "rm_2" / "rm_info.json").read_text())
    args = rm_info["args"]
    assert Path(args["policy"]) == run.dir / "ppo_1"
    assert Path(args["reward_model_before"]) == run.dir / "rm_1"
    rm_1, tokenizer = C.load_reward_model(run.dir / "rm_1", "cpu")
    policy, _ = C.load_policy(run.dir / "ppo_1", "cpu")
    expected = brute_force_policy_pair_accuracy({"before": rm_1}, policy, tokenizer,
                                                args["diag_prompts"], args["seed"],
                                                args["forward_batch_size"])
    got = rm_info["policy_pair_accuracy"]
    assert got["num_untied_pairs"] == expected["num_untied_pairs"]
    assert got["before"] == pytest.approx(expected["before"], abs=1e-6)


def test_every_ppo_stage_logs_every_metric_at_every_update(run):
    for name in PPO_DIRS:
        rows = read_jsonl(run.dir / name / "metrics.jsonl")
        assert [r["update"] for r in rows] == list(range(1, UPDATES + 1)), name
        assert [r["episodes"] for r in rows] == [u * BATCH_SIZE for u in range(1, UPDATES + 1)]
        lr = json.loads((run.dir / name / "ppo_info.json").read_text())["args"]["lr"]
        for r in rows:
            missing = set(METRIC_KEYS) - set(r)
            assert not missing, f"{name} update {r.get('update')} lacks {sorted(missing)}"
            assert all(math.isfinite(r[k]) for k in METRIC_KEYS), (name, r)
            assert 0.0 <= r["no_eos_fraction"] <= 1.0 and 0.0 <= r["clipfrac"] <= 1.0
            # the learning rate of update u decays linearly: lr (1 - (u - 1) / updates)
            assert r["lr"] == pytest.approx(lr * (1 - (r["update"] - 1) / UPDATES))


def test_reference_reset_separates_kl_to_ref_from_kl_to_sft(run):
    """Standard RLHF keeps pi_sft as its KL reference, so its two KLs are one number; the
    reference-reset arms pull towards pi_1 instead, which starts round 2 as the policy itself."""
    standard = read_jsonl(run.dir / "standard_rlhf" / "round_2" / "metrics.jsonl")
    assert all(r["kl_to_ref"] == r["kl_to_sft"] for r in standard)
    for arm in ("ppo_new_kl", "ocrm"):
        rows = read_jsonl(run.dir / arm / "round_2" / "metrics.jsonl")
        assert all(r["kl_to_ref"] != r["kl_to_sft"] for r in rows), arm
        assert abs(rows[0]["kl_to_ref"]) < 1e-4, f"{arm}: the first rollout's KL to itself"
        assert abs(rows[0]["kl_to_sft"]) > 1e-3, f"{arm}: pi_1 should already differ from pi_sft"


# ----------------------------------------------------------------------------------------------
# 2. Resuming: finished stages are skipped, an interrupted one is redone
# ----------------------------------------------------------------------------------------------
def test_rerun_on_a_finished_run_skips_every_stage(run):
    before = file_mtimes(run.dir)
    report_mtime = (run.dir / "report.json").stat().st_mtime_ns
    proc = run_all(run.dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage_lines = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert stage_lines == [f"== skip {run.dir / s} (finished)" for s in STAGES]
    assert file_mtimes(run.dir) == before, "a stage wrote to its finished output"
    assert json.loads((run.dir / "report.json").read_text()) == run.report
    assert (run.dir / "report.json").stat().st_mtime_ns > report_mtime   # rebuilt from disk


def test_interrupted_stage_is_redone_and_nothing_else(run, tmp_path):
    """A stage killed mid-write leaves `.NAME.tmp`; re-running redoes only that stage, and on CPU
    the redone stage reproduces the original numbers exactly."""
    run_dir = tmp_path / "run"
    shutil.copytree(run.dir, run_dir)
    shutil.rmtree(run_dir / "ocrm" / "round_2")
    (run_dir / "report.json").unlink()
    stale = run_dir / "ocrm" / ".round_2.tmp"
    stale.mkdir()
    (stale / "metrics.jsonl").write_text("half a line")

    proc = run_all(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage_lines = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert stage_lines == [f"== {run_dir / s}" if s == "ocrm/round_2"
                           else f"== skip {run_dir / s} (finished)" for s in STAGES]
    assert not stale.exists()

    report = json.loads((run_dir / "report.json").read_text())
    assert report["arms"] == run.report["arms"]
    assert report["weights"] == run.report["weights"]
    redone = read_jsonl(run_dir / "ocrm" / "round_2" / "metrics.jsonl")
    original = read_jsonl(run.dir / "ocrm" / "round_2" / "metrics.jsonl")
    assert [without(r, *TIMINGS) for r in redone] == \
        [without(r, *TIMINGS) for r in original]


# Killing the run: SIGKILL to run_all.sh's whole process group (bash and the running stage) at
# four points, a rerun after each, and at the end the report of the uninterrupted run.
# Files whose bytes hold wall-clock times; every other file of a run is byte-identical on CPU.
TIMED_FILES = {"sft_info.json", "rm_info.json", "ppo_info.json", "dpo_info.json", "metrics.jsonl",
               "report.json", "report.md", "curves.png"}
# Imported at start-up by every Python process of a run that is about to be killed (it is put on
# PYTHONPATH): the stage that would rename `.NAME.tmp` to the output HOLD_BEFORE_RENAME names
# sleeps instead. The test can then kill the run while `.NAME.tmp` is there (without the hold the
# rename follows the last write within ~5 ms), and a slow test cannot let that stage finish first.
HOLD_BEFORE_RENAME = """\
import os, time
_held = os.environ.get("HOLD_BEFORE_RENAME")
if _held:
    _replace = os.replace
    def _replace_after_a_hold(src, dst, *args, **kwargs):
        if os.path.abspath(src) == _held:
            time.sleep(600)
        return _replace(src, dst, *args, **kwargs)
    os.replace = _replace_after_a_hold
"""
# (where the run is killed, when: the run dir and stdout lines so far -> bool, the output whose
# rename is held, how many of OUTPUTS are finished once the run is dead)
KILL_POINTS = [
    ("inside sft.py, while .sft.tmp is being written",
     lambda d, lines: (d / ".sft.tmp").is_dir(), "sft", 0),
    ("inside reward_model.py: pairs saved, RM_1 being fitted",
     lambda d, lines: any(line.startswith("prefs: ") for line in lines), "rm_1", 2),
    ("between stages: run_all.sh has just announced ppo_1",
     lambda d, lines: f"== {d / 'ppo_1'}" in lines, "ppo_1", 3),
    ("inside ocrm_correct.py: weights saved, RM_2 being fitted",
     lambda d, lines: any(line.startswith("ocrm: weights ESS") for line in lines), "ocrm/rm_2", 5),
]
# The killed run does the shared stages and the ocrm arm only (ARMS=ocrm: the arm that saves an
# intermediate output); each of its outputs must equal the full run's, whose other arms it skips.
KILL_ARMS = "ocrm"
KILL_STAGES = ["sft", "rm_1", "ppo_1", "ocrm/rm_2", "ocrm/round_2"]
# KILL_OUTPUTS: everything those stages write, in the order the run finishes them (prefs and
# weights_2 are saved inside the rm_1 and ocrm/rm_2 stages, before they fit their reward models).
KILL_OUTPUTS = ["sft", "prefs", "rm_1", "ppo_1", "ocrm/weights_2", "ocrm/rm_2", "ocrm/round_2"]
REPORT_FILES = {Path("report.json"), Path("report.md"), Path("curves.png")}


def tmp_of(run_dir: Path, output: str) -> Path:
    """Where common.atomic_output writes `output` before renaming it."""
    return (run_dir / output).parent / f".{Path(output).name}.tmp"


def visible_files(run_dir: Path) -> set[Path]:
    """Every file of the run dir, relative, except those under a hidden (`.`) name."""
    return {p.relative_to(run_dir) for p in run_dir.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run_dir).parts)}


def hidden_entries(run_dir: Path) -> set[Path]:
    return {p.relative_to(run_dir) for p in run_dir.rglob(".*")}


def expected_stage_lines(run_dir: Path, finished: list[str], stages=STAGES) -> list[str]:
    """The `== ` lines run_all.sh prints when the outputs `finished` are already on disk."""
    return [f"== skip {run_dir / s} (finished)" if s in finished else f"== {run_dir / s}"
            for s in stages]


def run_all_until_killed(run_dir: Path, kill_when, hold: str, hook_dir: Path, log: Path) -> list[str]:
    """run_all.sh in a process group of its own until `kill_when` holds, then SIGKILL the whole
    group; returns the stdout lines read by then (the stage holds back renaming `hold`)."""
    env = pipeline_env(
        run_dir, ARMS=KILL_ARMS, PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")])),
        HOLD_BEFORE_RENAME=str(tmp_of(run_dir, hold)))
    with open(log, "a") as stderr:
        proc = subprocess.Popen(["bash", "run_all.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=stderr, text=True, start_new_session=True)
    lines = []

    def read_stdout():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read_stdout)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not kill_when(run_dir, list(lines)):
            if proc.poll() is not None:
                pytest.fail(f"run_all.sh ended (exit {proc.returncode}) before it could be killed; "
                            f"stdout:\n" + "\n".join(lines) + f"\nstderr:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the kill point was not reached within 300 s")
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join()
    assert proc.returncode == -signal.SIGKILL
    for _ in range(500):                  # the stage process too is gone, so nothing writes on
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    else:
        pytest.fail("a process of the killed run is still alive")
    return lines


def snapshot(run_dir: Path) -> dict:
    """What a test checks of a run dir: its visible files with their bytes (the dir's own name
    replaced by RUN_DIR, timed files aside) and its hidden entries."""
    files = visible_files(run_dir)
    return {"files": files, "hidden": hidden_entries(run_dir),
            "bytes": {f: (run_dir / f).read_bytes().replace(str(run_dir).encode(), b"RUN_DIR")
                      for f in files if f.name not in TIMED_FILES}}


def kill_and_resume(scratch: Path) -> dict:
    """The subprocess work of the kill test: the run killed at each of KILL_POINTS, a snapshot of
    the run dir after each kill, then the rerun that finishes it. It needs nothing from the
    shared run, so conftest.py starts it in the background right after collection."""
    run_dir, hook_dir, log = scratch / "run", scratch / "hook", scratch / "stderr.log"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOLD_BEFORE_RENAME)
    kills = []
    for where, kill_when, hold, n_finished in KILL_POINTS:
        lines = run_all_until_killed(run_dir, kill_when, hold, hook_dir, log)
        kills.append({"lines": lines, "held_tmp_is_dir": tmp_of(run_dir, hold).is_dir(),
                      **snapshot(run_dir)})
    proc = run_all(run_dir, ARMS=KILL_ARMS)
    return {"run_dir": run_dir, "kills": kills, "proc": proc, "final": snapshot(run_dir),
            "report": json.loads((run_dir / "report.json").read_text())
            if proc.returncode == 0 else None}


class InThread:
    """fn(scratch) in a thread from now on; .result() joins it and returns (or re-raises)."""

    def __init__(self, fn, scratch):
        self._out = {}
        self._thread = threading.Thread(target=self._body, args=(fn, scratch), daemon=True)
        self._thread.start()

    def _body(self, fn, scratch):
        try:
            self._out["value"] = fn(scratch)
        except BaseException as e:   # pytest.fail raises a BaseException
            self._out["error"] = e

    def result(self, timeout: float = 900):
        self._thread.join(timeout)
        if self._thread.is_alive():
            pytest.fail(f"the background work did not end within {timeout} s")
        if "error" in self._out:
            raise self._out["error"]
        return self._out["value"]

    def stop(self):   # kill whatever subprocess the thread is waiting for; the thread then ends
        for proc in list(LIVE):
            kill_group(proc)


BACKGROUND_TESTS = {"test_run_killed_at_any_point_resumes_to_the_uninterrupted_report":
                    lambda scratch: InThread(kill_and_resume, scratch)}
BACKGROUND: dict = {}


def test_run_killed_at_any_point_resumes_to_the_uninterrupted_report(run, tmp_path):
    """SIGKILL the whole run at four points (inside a stage's write, inside a stage after it saved
    an intermediate output, between stages) and rerun it each time. After every kill, each output
    that is visible is complete and byte-identical to the uninterrupted run's, and the rest is at
    most a hidden `.NAME.tmp`; every rerun skips what is finished and reuses the saved pairs and
    weights; the finished run reports exactly the numbers of the uninterrupted one."""
    name = "test_run_killed_at_any_point_resumes_to_the_uninterrupted_report"
    handle = BACKGROUND.get(name) or InThread(kill_and_resume, tmp_path)
    out = handle.result()
    run_dir, reference = out["run_dir"], snapshot(run.dir)
    reference_files = {f for f in reference["files"] if any(f.is_relative_to(o) for o in KILL_OUTPUTS)}
    finished: list[str] = []
    for (where, _, hold, n_finished), kill in zip(KILL_POINTS, out["kills"]):
        stage_lines = [line for line in kill["lines"] if line.startswith("== ")]
        expected = expected_stage_lines(run_dir, finished, KILL_STAGES)
        assert stage_lines == expected[:len(stage_lines)], where
        if "prefs" in finished:
            assert not any(line.startswith("prefs: ") for line in kill["lines"]), "the pairs were redone"

        finished = KILL_OUTPUTS[:n_finished]
        assert kill["files"] == {f for f in reference_files
                                 if any(f.is_relative_to(o) for o in finished)}, \
            f"killed {where}: visible files are not exactly those of the finished outputs"
        for f, data in kill["bytes"].items():
            assert data == reference["bytes"][f], f"killed {where}: {f} differs"
        assert kill["hidden"] <= {tmp_of(run_dir, hold).relative_to(run_dir)}, where
        if hold == "sft":
            assert kill["held_tmp_is_dir"]

    proc, final = out["proc"], out["final"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage_lines = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert stage_lines == expected_stage_lines(run_dir, finished, KILL_STAGES)
    assert f"ocrm: reusing the weights in {run_dir / 'ocrm' / 'weights_2'}" in proc.stdout
    assert final["files"] == reference_files | REPORT_FILES
    for f in reference_files:
        assert final["bytes"].get(f) == reference["bytes"].get(f), f"{f} differs"
    assert final["hidden"] == set(), "a stale .NAME.tmp survived the finished run"
    report = out["report"]
    assert report["arms"] == {arm: run.report["arms"][arm] for arm in ("sft", "ocrm")}
    assert report["weights"] == run.report["weights"]
    assert set(report["seconds"]) == set(KILL_STAGES) | {"total"}



# ----------------------------------------------------------------------------------------------
# 2b. NPROC=2: every stage under torchrun (2 CPU processes, gloo), one rank killed mid-stage
# ----------------------------------------------------------------------------------------------
# A sitecustomize hook for the killed run: rank 1 SIGKILLs itself at its first optimizer step,
# so the first torchrun stage (sft.py) loses a rank in the middle of training, deterministically.
KILL_RANK_1 = """\
import os, signal
if os.environ.get("RANK") == "1" and os.environ.get("KILL_RANK_1"):
    import torch.optim
    def _die(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    torch.optim.AdamW.step = _die
"""


# One round (the shared stages): ocrm_correct.py under torchrun is tests/test_distributed.py's;
# every torchrun launch costs three interpreters' start-up
NPROC_RUN = {"NPROC": "2", "ROUNDS": "1", "ARMS": "ocrm"}
NPROC_OUTPUTS = ["sft", "prefs", "rm_1", "ppo_1"]


def torchrun_killed_and_resumed(scratch: Path) -> dict:
    """The subprocess work of the NPROC=2 test: a run whose rank 1 dies inside sft.py, then the
    rerun that finishes it. Started at collection (conftest.py)."""
    run_dir, hook_dir = scratch / "run", scratch / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(KILL_RANK_1)
    pythonpath = os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")]))
    killed = run_all(run_dir, **NPROC_RUN, KILL_RANK_1="1", PYTHONPATH=pythonpath)
    after_kill = snapshot(run_dir)
    rerun = run_all(run_dir, **NPROC_RUN)
    return {"run_dir": run_dir, "killed": killed, "after_kill": after_kill, "rerun": rerun,
            "final": snapshot(run_dir),
            "report": json.loads((run_dir / "report.json").read_text())
            if rerun.returncode == 0 else None}


BACKGROUND_TESTS["test_nproc_2_writes_the_contract_and_resumes_after_a_rank_dies"] = \
    lambda scratch: InThread(torchrun_killed_and_resumed, scratch)


def test_nproc_2_writes_the_contract_and_resumes_after_a_rank_dies(run, tmp_path):
    """NPROC=2 bash run_all.sh: a rank SIGKILLed inside a stage fails the run and leaves nothing
    finished; the rerun completes it with every file of the single-process run's contract (the
    numbers differ: each rank samples with a generator of its own) and only rank 0's prints."""
    name = "test_nproc_2_writes_the_contract_and_resumes_after_a_rank_dies"
    out = (BACKGROUND.get(name) or InThread(torchrun_killed_and_resumed, tmp_path)).result()
    run_dir, killed = out["run_dir"], out["killed"]
    assert killed.returncode != 0, "the run went on after a rank died"
    assert f"== {run_dir / 'sft'}" in killed.stdout
    assert out["after_kill"]["files"] == set(), "a stage whose rank died left visible output"
    rerun = out["rerun"]
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    reference = {f for f in snapshot(run.dir)["files"]
                 if any(f.is_relative_to(o) for o in NPROC_OUTPUTS)}
    assert out["final"]["files"] == reference | REPORT_FILES
    assert out["final"]["hidden"] == set()
    for stage in ("sft: final loss", "reward model: held-out", "ppo: final gold"):
        assert rerun.stdout.count(stage) == 1, stage             # rank 0 prints, rank 1 does not
    assert "sft" in out["report"]["arms"]


# ----------------------------------------------------------------------------------------------
# 3. Determinism: same seed and inputs, same bytes and the same metrics
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def second_runs(run, tmp_path_factory):
    """sft.py and ppo.py run a second time, side by side, with the exact flags of the run's sft/
    and ppo_1/ (from their *_info.json) but another --out; the run's own dirs are the first runs."""
    stages = {"sft": ("sft.py", "sft_info.json"), "ppo_1": ("ppo.py", "ppo_info.json")}
    outs, procs = {}, {}
    for name, (script, info) in stages.items():
        outs[name] = tmp_path_factory.mktemp("second") / name
        procs[name] = subprocess.Popen(
            [PY, script, *stage_argv(run.dir / name / info, outs[name])], cwd=ROOT, env=BASE_ENV,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"second {name} run failed:\n{stderr[-3000:]}"
    return SimpleNamespace(**outs)


def test_sft_with_the_same_seed_writes_identical_weights(run, second_runs):
    assert (second_runs.sft / "model.safetensors").read_bytes() == \
        (run.dir / "sft" / "model.safetensors").read_bytes()


def test_ppo_with_the_same_seed_and_inputs_logs_identical_metrics(run, second_runs):
    first, second = run.dir / "ppo_1", second_runs.ppo_1
    assert [without(r, *TIMINGS) for r in read_jsonl(second / "metrics.jsonl")] == \
        [without(r, *TIMINGS) for r in read_jsonl(first / "metrics.jsonl")]
    assert read_jsonl(second / "eval.jsonl") == read_jsonl(first / "eval.jsonl")
    assert json.loads((second / "final.json").read_text()) == \
        json.loads((first / "final.json").read_text())
    assert (second / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------------------------
# 4. Bad inputs: exit code 2, one `error:` line, nothing written
# ----------------------------------------------------------------------------------------------
TINY_PPO = ["--device", "cpu", "--updates", "2", "--batch_size", "8", "--eval_every", "1",
            "--eval_prompts", "32"]


def ppo_cmd(run_dir, tmp, init=None, reward_model=None, out=None, kl_ref=None):
    return ["ppo.py", "--init", init or run_dir / "sft", "--kl_ref", kl_ref or run_dir / "sft",
            "--sft", run_dir / "sft", "--reward_model", reward_model or run_dir / "rm_1",
            "--out", out or tmp / "out", *TINY_PPO]


def rm_cmd(run_dir, tmp, sft=None, prefs=None):
    return ["reward_model.py", "--sft", sft or run_dir / "sft", "--prefs", prefs or tmp / "prefs",
            "--out", tmp / "out", "--device", "cpu", "--num_pairs", "16", "--epochs", "1"]


def ocrm_cmd(run_dir, tmp, *flags, policy=None, prefs=None):
    return ["ocrm_correct.py", "--policy", policy or run_dir / "ppo_1", "--sft", run_dir / "sft",
            "--prefs", prefs or run_dir / "prefs", "--weights_out", tmp / "weights",
            "--out", tmp / "out", "--device", "cpu", "--epochs", "1", *flags]


def copy_rm(run_dir, tmp) -> Path:
    return Path(shutil.copytree(run_dir / "rm_1", tmp / "rm_copy"))


def truncated_rm(run_dir, tmp):
    rm = copy_rm(run_dir, tmp)
    weights = rm / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    return rm


def rm_with_other_tokenizer(run_dir, tmp):
    rm = copy_rm(run_dir, tmp)
    tokenizer = AutoTokenizer.from_pretrained(rm)
    tokenizer.add_tokens(["extra"])
    tokenizer.save_pretrained(rm)
    return rm


class RunsCodeWhenUnpickled:
    """Unpickling this runs code (here: it creates the file `marker`), as a malicious
    pytorch_model.bin could; torch.load(weights_only=True) refuses it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def pickle_policy(run_dir, tmp):
    """The SFT weights as a pickle (no safetensors), booby-trapped: had anything unpickled it,
    the file `unpickled` would appear in the work dir, which the test forbids."""
    path = tmp / "bin_policy"       # (a name that does not itself say "pickle")
    path.mkdir()
    shutil.copy(run_dir / "sft" / "config.json", path)
    weights = load_file(run_dir / "sft" / "model.safetensors")
    torch.save({**weights, "trap": RunsCodeWhenUnpickled(tmp / "unpickled")},
               path / "pytorch_model.bin")
    return path


def prefs_without_a_column(run_dir, tmp):
    rows = datasets.load_from_disk(str(run_dir / "prefs"))[:8]
    path = tmp / "prefs_missing_column"
    datasets.Dataset.from_dict(without(rows, "logp_sft_rejected")).save_to_disk(str(path))
    return path


def empty_prefs(run_dir, tmp):
    columns = datasets.load_from_disk(str(run_dir / "prefs")).column_names
    path = tmp / "prefs_empty"
    datasets.Dataset.from_dict({c: [] for c in columns}).save_to_disk(str(path))
    return path


def empty_dir(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


def regular_file(tmp):
    (tmp / "a_file").write_text("not a directory")
    return tmp / "a_file"


def existing_dir(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("earlier results")
    return tmp / "out"


def ocrm_with_earlier_weights_and_another_lam(run_dir, tmp):
    """ocrm_correct.py whose --weights_out already holds the run's weights_2 (as an interrupted
    call leaves it), asked for a different --lam than those weights were made with."""
    weights = Path(shutil.copytree(run_dir / "ocrm" / "weights_2", tmp / "weights"))
    lam = json.loads((weights / "settings.json").read_text())["lam"]
    return ocrm_cmd(run_dir, tmp, "--lam", str(lam + 1.0))


def ocrm_with_earlier_weights_and_other_prefs(run_dir, tmp):
    """The same, with the run's own settings but other stored pairs to re-weight."""
    shutil.copytree(run_dir / "ocrm" / "weights_2", tmp / "weights")
    return ocrm_cmd(run_dir, tmp, prefs=Path(shutil.copytree(run_dir / "prefs", tmp / "prefs2")))


# name -> (what the message must mention, a function (run_dir, tmp) -> command). A command that
# starts with a script name runs forked, with sys.executable or bash as a real subprocess; a
# trailing dict on a bash command is its environment.
BAD_INPUTS = {
    "ppo_init_missing": ("does not exist", lambda r, t: ppo_cmd(r, t, init=t / "nowhere")),
    "ppo_reward_model_is_a_policy": ("not a reward model",
                                     lambda r, t: ppo_cmd(r, t, reward_model=r / "sft")),
    "ppo_init_is_a_reward_model": ("not a policy", lambda r, t: ppo_cmd(r, t, init=r / "rm_1")),
    "rm_sft_is_an_empty_dir": ("no model", lambda r, t: rm_cmd(r, t, sft=empty_dir(t))),
    "rm_prefs_lack_a_column": ("logp_sft_rejected",
                               lambda r, t: rm_cmd(r, t, prefs=prefs_without_a_column(r, t))),
    # (datasets cannot load back a 0-row dataset it saved, so "holds 0 pairs" is not reachable)
    "rm_prefs_have_no_rows": ("prefs_empty", lambda r, t: rm_cmd(r, t, prefs=empty_prefs(r, t))),
    "ocrm_alpha_one": ("--alpha", lambda r, t: ocrm_cmd(r, t, "--alpha", "1.0")),
    "ocrm_lam_negative": ("--lam", lambda r, t: ocrm_cmd(r, t, "--lam", "-1")),
    "ocrm_min_ess_one": ("--min_ess", lambda r, t: ocrm_cmd(r, t, "--min_ess", "1")),
    "ocrm_one_fresh_pair": ("--fresh_pairs", lambda r, t: ocrm_cmd(r, t, "--fresh_pairs", "1")),
    "run_all_zero_rounds": ("ROUNDS", lambda r, t: ["bash", "run_all.sh", {"ROUNDS": "0",
                                                                            "RUN_DIR": t / "run"}]),
    # a real interpreter, to check that the forked runs of the other cases behave like one
    "sft_cuda_without_cuda": ("CUDA", lambda r, t: [PY, "sft.py", "--out", t / "out",
                                                    "--device", "cuda"]),
    "ppo_out_parent_is_a_file": ("cannot write",
                                 lambda r, t: ppo_cmd(r, t, out=regular_file(t) / "out")),
    "ppo_reward_model_truncated": ("could not load",
                                   lambda r, t: ppo_cmd(r, t, reward_model=truncated_rm(r, t))),
    "ppo_reward_model_other_tokenizer": ("tokenizer", lambda r, t: ppo_cmd(
        r, t, reward_model=rm_with_other_tokenizer(r, t))),
    "ppo_init_pickle_checkpoint": ("holds a pickle checkpoint",
                                   lambda r, t: ppo_cmd(r, t, init=pickle_policy(r, t))),
    # beyond the list in the task: inputs a user can easily get wrong
    "ppo_out_exists": ("exists", lambda r, t: ppo_cmd(r, t, out=existing_dir(t))),
    "ppo_zero_minibatches": ("minibatches", lambda r, t: ppo_cmd(r, t) + ["--minibatches", "0"]),
    "rm_zero_heldout_fraction": ("--heldout_fraction",
                                 lambda r, t: rm_cmd(r, t) + ["--heldout_fraction", "0"]),
    "ocrm_alpha_with_lam_zero": ("--alpha", lambda r, t: ocrm_cmd(
        r, t, "--lam", "0", "--alpha", "0.5")),
    "rm_zero_pair_temperature": ("--pair_temperature",
                                 lambda r, t: rm_cmd(r, t) + ["--pair_temperature", "0"]),
    "sft_fewer_examples_than_a_batch": ("", lambda r, t: [
        "sft.py", "--out", t / "out", "--device", "cpu", "--num_examples", "10"]),
    "sft_unknown_device": ("gpu", lambda r, t: ["sft.py", "--out", t / "out", "--device", "gpu"]),
    # a flag that does nothing in the chosen configuration is an error, not silence
    "sft_dataset_flag_on_the_embedded_task": ("--prompt_field", lambda r, t: [
        "sft.py", "--out", t / "out", "--device", "cpu", "--prompt_field", "post"]),
    "sft_gradient_checkpointing_on_the_embedded_task": ("--gradient_checkpointing", lambda r, t: [
        "sft.py", "--out", t / "out", "--device", "cpu", "--gradient_checkpointing", "1"]),
    "rm_gradient_checkpointing_on_a_frozen_backbone": ("--train_backbone", lambda r, t: rm_cmd(
        r, t) + ["--gradient_checkpointing", "1"]),
    "rm_reused_prefs_made_with_other_num_pairs": (f"--num_pairs {NUM_PAIRS} (asked 16)", lambda r, t: rm_cmd(
        r, t, prefs=r / "prefs")),
    "ocrm_neither_stored_nor_fresh_pairs": ("--prefs", lambda r, t: [
        "ocrm_correct.py", "--policy", r / "ppo_1", "--sft", r / "sft", "--weights_out",
        t / "weights", "--out", t / "out", "--device", "cpu"]),
    "ocrm_diag_prompts_without_a_diagnostic": ("--reward_model_before", lambda r, t: ocrm_cmd(
        r, t, "--diag_prompts", "64")),
    "ocrm_label_without_fresh_pairs": ("--fresh_pairs", lambda r, t: ocrm_cmd(r, t, "--label", "bt")),
    "ocrm_weight_flag_with_fresh_pairs": ("--lam", lambda r, t: ocrm_cmd(
        r, t, "--fresh_pairs", "100", "--lam", "0.5")),
    "ocrm_min_ess_with_fresh_pairs": ("--min_ess", lambda r, t: ocrm_cmd(
        r, t, "--fresh_pairs", "100", "--min_ess", "0.3")),
    # weights left by an interrupted call are reused only if they were made the same way
    "ocrm_earlier_weights_other_lam": ("another lam", ocrm_with_earlier_weights_and_another_lam),
    "ocrm_earlier_weights_other_prefs": ("another prefs", ocrm_with_earlier_weights_and_other_prefs),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_with_one_error_line_and_writes_nothing(run, tmp_path, case):
    must_mention, make_command = BAD_INPUTS[case]
    work = tmp_path / "work"
    work.mkdir()
    cmd = make_command(run.dir, work)
    before = sorted(work.rglob("*"))
    if cmd[0] == "bash":
        *cmd, env = cmd
        proc = run_command(cmd, env=env, timeout=60)
    elif cmd[0] == PY:
        proc = run_command(cmd, timeout=120)
    else:
        proc = run_forked(cmd, tmp_path / "child")

    assert proc.returncode == 2, f"exit {proc.returncode}; stderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), \
        f"stderr is not one `error:` line:\n{proc.stderr[-3000:]}"
    assert must_mention.lower() in lines[0].lower(), lines[0]
    assert sorted(work.rglob("*")) == before, "the failed stage left files behind"


# ----------------------------------------------------------------------------------------------
# 5. Numerical faults: a NaN or inf stops the stage with one `error:` line naming the stage, the
#    update and the quantity; exit code 2; nothing saved
# ----------------------------------------------------------------------------------------------
# One AdamW step moves every weight by about the learning rate, so after one step at 1e6 the next
# forward pass overflows (checked by hand: the loss or logits are NaN from then on).
HUGE_LR = ["--lr", "1e6"]


def with_nan_tensor(checkpoint: Path, tmp: Path, tensor: str) -> Path:
    """A copy of `checkpoint` whose weight `tensor` is all NaN."""
    path = Path(shutil.copytree(checkpoint, tmp / f"{checkpoint.name}_nan"))
    weights = load_file(path / "model.safetensors")
    weights[tensor] = torch.full_like(weights[tensor], float("nan"))
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def prefs_with_nan(run_dir: Path, tmp: Path, column: str) -> Path:
    """A copy of the run's pairs in which one pair's `column` is NaN (a missing column is added,
    1 for every other pair)."""
    data = datasets.load_from_disk(str(run_dir / "prefs"))
    values = list(data[column]) if column in data.column_names else [1.0] * len(data)
    values[3] = float("nan")
    if column in data.column_names:
        data = data.remove_columns(column)
    path = tmp / "prefs_nan"
    data.add_column(column, values).save_to_disk(str(path))
    return path


NAN_POLICY = "transformer.ln_f.weight"     # NaN in the last layer norm: every logit is NaN
# name -> (stage, quantity, the update the error names (None: not an update), command)
NUMERICAL_FAULTS = {
    # two updates: the first loss comes from the initial weights, the second after a huge step
    "sft_loss_after_a_huge_step": ("sft", "loss", 2, lambda r, t: [
        "sft.py", "--out", t / "out", "--device", "cpu", "--num_examples", "128",
        "--batch_size", "64", "--epochs", "1", *HUGE_LR]),
    # two epochs, so at least two updates; the whole network trained (a linear head alone, the
    # default, stays finite however large the step)
    "rm_loss_after_a_huge_step": ("reward_model", "loss", 2, lambda r, t: rm_cmd(
        r, t, prefs=r / "prefs") + ["--num_pairs", str(NUM_PAIRS), "--epochs", "2",
                                    "--train_backbone", "1", *HUGE_LR]),
    "rm_weight_nan": ("reward_model", "weight", None,
                      lambda r, t: rm_cmd(r, t, prefs=prefs_with_nan(r, t, "weight"))),
    "rm_pairs_sampled_from_a_nan_policy": ("reward_model", "policy logits", None,
                                           lambda r, t: rm_cmd(r, t, sft=with_nan_tensor(
                                               r / "sft", t, NAN_POLICY))),
    "ppo_reward_model_score_head_nan": ("ppo", "reward", 1, lambda r, t: ppo_cmd(
        r, t, reward_model=with_nan_tensor(r / "rm_1", t, "score.weight"))),
    "ppo_kl_reference_nan": ("ppo", "KL penalty", 1, lambda r, t: ppo_cmd(
        r, t, kl_ref=with_nan_tensor(r / "ppo_1", t, NAN_POLICY))),
    # two minibatches: the second one's loss follows one huge step
    "ppo_loss_after_a_huge_step": ("ppo", "loss", 1, lambda r, t: ppo_cmd(r, t) + [
        *HUGE_LR, "--minibatches", "2"]),
    # one step per update: update 2 samples its rollout from the diverged policy
    "ppo_rollout_after_a_huge_step": ("ppo", "policy logits", 2, lambda r, t: ppo_cmd(r, t) + [
        *HUGE_LR, "--minibatches", "1", "--ppo_epochs", "1", "--eval_every", "100"]),
    "ocrm_logp_sft_nan": ("ocrm_correct", "weight", None, lambda r, t: ocrm_cmd(
        r, t, prefs=prefs_with_nan(r, t, "logp_sft_chosen"))),
    "ocrm_policy_nan": ("ocrm_correct", "weight", None, lambda r, t: ocrm_cmd(
        r, t, policy=with_nan_tensor(r / "ppo_1", t, NAN_POLICY))),
}


@pytest.mark.parametrize("case", list(NUMERICAL_FAULTS))
def test_numerical_fault_stops_the_stage_and_saves_nothing(run, tmp_path, case):
    stage, quantity, update, make_command = NUMERICAL_FAULTS[case]
    work = tmp_path / "work"
    work.mkdir()
    cmd = make_command(run.dir, work)
    before = sorted(work.rglob("*"))
    proc = run_forked(cmd, tmp_path / "child")

    assert proc.returncode == 2, f"exit {proc.returncode}; stderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # progress bars may come first, but the error is a line of its own (a log's `^error:`), last
    lines = proc.stderr.rstrip("\n").split("\n")
    assert sum("error:" in line for line in lines) == 1, proc.stderr[-3000:]
    assert lines[-1].startswith(f"error: {stage}: non-finite {quantity}"), proc.stderr[-3000:]
    if update is None:
        assert " at update " not in lines[-1], lines[-1]
    else:
        assert f" at update {update};" in lines[-1], lines[-1]
    assert sorted(work.rglob("*")) == before, "the failed stage saved something"


# ----------------------------------------------------------------------------------------------
# 6. Safe loading: weights come from safetensors only; nothing is ever unpickled
# ----------------------------------------------------------------------------------------------
def test_a_pickle_next_to_the_safetensors_is_never_unpickled(run, tmp_path):
    """The policy and reward-model loaders read model.safetensors and leave a booby-trapped
    pytorch_model.bin beside it alone."""
    marker = tmp_path / "unpickled"
    loaded = {}
    for name, load in (("sft", C.load_policy), ("rm_1", C.load_reward_model)):
        path = Path(shutil.copytree(run.dir / name, tmp_path / name))
        torch.save({"trap": RunsCodeWhenUnpickled(marker)}, path / "pytorch_model.bin")
        loaded[name], _ = load(path, "cpu")
    assert not marker.exists(), "a loader unpickled pytorch_model.bin"
    for name, model in loaded.items():
        expected = load_file(run.dir / name / "model.safetensors")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items()), name

    torch.load(tmp_path / "sft" / "pytorch_model.bin", weights_only=False)   # the trap is real
    assert marker.exists()


def recorded_calls(tmp_path: Path, **env) -> list[str]:
    """The Python calls run_all.sh makes, recorded by a stand-in PYTHON (nothing runs)."""
    tmp_path.mkdir(exist_ok=True)
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n')
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    proc = run_command(["bash", "run_all.sh"], env={
        "PYTHON": fake, "CALLS": calls, "RUN_DIR": tmp_path / "run", "ROUNDS": "2", "ARM_JOBS": "1",
        **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return calls.read_text().splitlines()


def test_editing_run_all_sh_during_a_run_does_not_change_the_running_pipeline(tmp_path):
    """bash reads a script as it runs it; run_all.sh is read whole first, so a stand-in PYTHON
    that rewrites the script at its first call (SFT) leaves the running pipeline unchanged."""
    script = tmp_path / "run_all.sh"
    shutil.copy(ROOT / "run_all.sh", script)
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n'
                    'printf \'echo edited; exit 7\\n%.0s\' $(seq 400) > "$SCRIPT"\n')
    fake.chmod(0o755)
    env = {"PYTHON": fake, "CALLS": tmp_path / "calls", "SCRIPT": script,
           "RUN_DIR": tmp_path / "run", "ROUNDS": "2", "ARMS": "standard_rlhf ocrm"}
    proc = run_command(["bash", script], env=env, timeout=60)
    assert (proc.returncode, "edited" in proc.stdout) == (0, False), proc.stdout + proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 7 and calls[-1].startswith("report.py")   # sft ... ocrm round 2, report
    assert script.read_text().startswith("echo edited")              # it was edited mid-run


@pytest.mark.parametrize("arm", ["fresh_pairs", "fresh_plus_stored"])
@pytest.mark.parametrize("pairs_args, label", [("--num_pairs 64 --label bt", "bt"),
                                               ("--label=bt", "bt"), ("--num_pairs 64", None)])
def test_fresh_pairs_controls_label_like_the_stored_pairs(tmp_path, arm, pairs_args, label):
    calls = recorded_calls(tmp_path, ARMS=arm, PAIRS_ARGS=pairs_args)
    refit = [c for c in calls if c.startswith("ocrm_correct.py")]
    assert len(refit) == 1 and "--fresh_pairs 10000" in refit[0]
    # only the second control keeps the stored pairs
    assert ("--prefs" in refit[0]) == (arm == "fresh_plus_stored")
    if label is None:
        assert "--label" not in refit[0]               # ocrm_correct.py's default: argmax
    else:
        assert refit[0].endswith(f"--fresh_pairs 10000 --label {label}"), refit[0]


def test_nproc_launches_every_python_stage_under_torchrun(tmp_path):
    calls = recorded_calls(tmp_path, NPROC="3", ARMS="ocrm dpo")
    stages = [c for c in calls if not c.startswith("report.py")]
    assert len(stages) == 6                            # sft, rm_1, ppo_1, dpo, ocrm rm_2 and round_2
    prefix = "-m torch.distributed.run --standalone --nproc_per_node 3 "
    assert all(c.startswith(prefix) for c in stages), stages
    assert calls[-1].startswith("report.py")           # the report is one process
    assert not any(c.startswith(prefix) for c in recorded_calls(tmp_path / "one", ARMS="ocrm"))


def test_eval_prompts_reach_every_evaluating_stage_and_unset_leaves_the_scripts_default(tmp_path):
    def evaluating(calls):
        return [c for c in calls if c.startswith(("ppo.py", "dpo.py"))]
    unset = evaluating(recorded_calls(tmp_path / "unset", ARMS="standard_rlhf dpo"))
    assert len(unset) == 3 and not any("--eval_prompts" in c for c in unset), unset
    import dpo
    import ppo
    assert ppo.parse_args(["--out", "o", "--init", "i", "--kl_ref", "k", "--reward_model", "r",
                           "--sft", "s"]).eval_prompts == \
        dpo.parse_args(["--sft", "s", "--prefs", "p", "--reward_model", "r", "--out", "o"]).eval_prompts
    given = evaluating(recorded_calls(tmp_path / "set", ARMS="standard_rlhf dpo", EVAL_PROMPTS="7"))
    assert len(given) == 3 and all("--eval_prompts 7" in c for c in given), given
