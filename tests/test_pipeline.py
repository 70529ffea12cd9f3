"""The whole pipeline on a tiny budget: the run-directory contract, resuming, determinism and
one-line errors for bad inputs.

One module-scoped run of `run_all.sh` (2 rounds, 2 PPO updates of 8 episodes per round) is
shared by every test here; it takes about a minute on a free CPU core. Run with

    python -m pytest tests/test_pipeline.py -q

Every subprocess gets OMP_NUM_THREADS=1: the runs are tiny, and two torch thread pools fighting
over a shared 2-core machine make PPO ~10x slower. The runs are deterministic under that setting
(CPU, one thread), which several tests below rely on.

The bad-input cases fail in a fraction of a second once torch and transformers are imported, but
a fresh interpreter spends ~5 s importing them. So most of those cases run each stage script in a
forked copy of this (already importing) test process, via `runpy`, and read the forked process's
real exit code, stdout and stderr; an uncaught exception there prints its traceback to stderr and
exits 1, as the interpreter would. Commands spelled with sys.executable or bash run as ordinary
subprocesses.
"""
import json
import math
import multiprocessing
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BASE_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}

# The tiny budget of the shared run (run_all.sh's environment variables)
UPDATES, BATCH_SIZE, ROUNDS = 2, 8, 2
PIPELINE_ENV = {
    "SEED": "1", "ROUNDS": str(ROUNDS), "UPDATES": str(UPDATES), "PYTHON": PY, "DEVICE": "cpu",
    "SFT_ARGS": "--num_examples 256 --epochs 1",
    "PAIRS_ARGS": "--num_pairs 128",
    "RM_ARGS": "--epochs 1",
    "PPO_ARGS": f"--eval_every 1 --eval_prompts 32 --batch_size {BATCH_SIZE}",
}
# Stage output directories, in the order run_all.sh makes them
STAGES = ["sft", "rm_1", "ppo_1", "standard_rlhf/round_2", "ppo_new_kl/round_2", "ocrm/rm_2",
          "ocrm/round_2"]
PPO_DIRS = ["ppo_1", "standard_rlhf/round_2", "ppo_new_kl/round_2", "ocrm/round_2"]
POLICY_DIRS = ["sft"] + PPO_DIRS
RM_DIRS = ["rm_1", "ocrm/rm_2"]
PREF_COLUMNS = ["prompt", "chosen", "rejected", "gold_chosen", "gold_rejected",
                "logp_sft_chosen", "logp_sft_rejected"]
METRIC_KEYS = ["update", "episodes", "kl_to_ref", "kl_to_sft", "proxy_reward", "gold_reward",
               "response_length", "no_eos_fraction", "entropy", "policy_loss", "value_loss",
               "clipfrac", "approx_kl", "lr", "episodes_per_second"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# Running things
# ----------------------------------------------------------------------------------------------
def run_command(cmd, env=None, timeout=300) -> subprocess.CompletedProcess:
    """An ordinary subprocess in the repo root, output captured."""
    env = {**BASE_ENV, **{k: str(v) for k, v in (env or {}).items()}}
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_all(run_dir: Path, **env) -> subprocess.CompletedProcess:
    return run_command(["bash", "run_all.sh"],
                       env={**PIPELINE_ENV, "RUN_DIR": str(run_dir), **env}, timeout=600)


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
    """The exact flags a finished stage ran with (its *_info.json), with a different --out."""
    args = json.loads(info_file.read_text())["args"]
    return [f"--{k}={out if k == 'out' else v}" for k, v in args.items()]


def file_mtimes(run_dir: Path, skip=("report.json", "report.md", "curves.png")) -> dict:
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and p.name not in skip}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The whole pipeline once, on the tiny budget; the report as it was right after the run."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    proc = run_all(run_dir)
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


def test_preference_pairs_are_well_formed(run):
    prefs = datasets.load_from_disk(str(run.dir / "prefs"))
    assert set(PREF_COLUMNS) <= set(prefs.column_names)
    assert len(prefs) == 128
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
    assert {"alpha", "lam", "normalize", "clip"} <= set(settings)
    alpha, lam = settings["alpha"], settings["lam"]

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


def test_report_has_every_arm_curve_weight_and_timing(run):
    report = run.report
    assert report["seed"] == 1
    assert set(report["arms"]) == {"sft", "standard_rlhf", "ppo_new_kl", "ocrm"}
    # each round adds UPDATES evaluation points, one per update (--eval_every 1)
    rounds_curve = [u * BATCH_SIZE for u in range(UPDATES * ROUNDS + 1)]
    for arm, r in report["arms"].items():
        for key in ("gold", "proxy", "kl_to_sft", "win_rate_vs_sft"):
            assert math.isfinite(r[key]), (arm, key)
        assert 0.0 <= r["win_rate_vs_sft"] <= 1.0
        episodes = [p["episodes"] for p in r["curve"]]
        assert all(set(p) == {"episodes", "kl_to_sft", "proxy", "gold"} for p in r["curve"])
        assert all(a < b for a, b in zip(episodes, episodes[1:])), (arm, episodes)
        assert episodes == ([0] if arm == "sft" else rounds_curve), arm
        if arm != "sft":   # the final numbers are those of the arm's last round
            final = json.loads((run.dir / arm / f"round_{ROUNDS}" / "final.json").read_text())
            assert (r["gold"], r["proxy"], r["win_rate_vs_sft"]) == \
                (final["gold"], final["proxy"], final["win_rate_vs_sft"])

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
    assert [without(r, "episodes_per_second") for r in redone] == \
        [without(r, "episodes_per_second") for r in original]


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
    assert [without(r, "episodes_per_second") for r in read_jsonl(second / "metrics.jsonl")] == \
        [without(r, "episodes_per_second") for r in read_jsonl(first / "metrics.jsonl")]
    assert read_jsonl(second / "eval.jsonl") == read_jsonl(first / "eval.jsonl")
    assert json.loads((second / "final.json").read_text()) == \
        json.loads((first / "final.json").read_text())
    assert (second / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------------------------
# 4. Bad inputs: exit code 2, one `error:` line, nothing written
# ----------------------------------------------------------------------------------------------
TINY_PPO = ["--device", "cpu", "--updates", "2", "--batch_size", "8", "--eval_every", "1",
            "--eval_prompts", "32"]


def ppo_cmd(run_dir, tmp, init=None, reward_model=None, out=None):
    return ["ppo.py", "--init", init or run_dir / "sft", "--kl_ref", run_dir / "sft",
            "--sft", run_dir / "sft", "--reward_model", reward_model or run_dir / "rm_1",
            "--out", out or tmp / "out", *TINY_PPO]


def rm_cmd(run_dir, tmp, sft=None, prefs=None):
    return ["reward_model.py", "--sft", sft or run_dir / "sft", "--prefs", prefs or tmp / "prefs",
            "--out", tmp / "out", "--device", "cpu", "--num_pairs", "16", "--epochs", "1"]


def ocrm_cmd(run_dir, tmp, *flags):
    return ["ocrm_correct.py", "--policy", run_dir / "ppo_1", "--sft", run_dir / "sft",
            "--prefs", run_dir / "prefs", "--weights_out", tmp / "weights", "--out", tmp / "out",
            "--device", "cpu", "--epochs", "1", *flags]


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


def pickle_policy(run_dir, tmp):
    path = tmp / "pickle_policy"
    path.mkdir()
    shutil.copy(run_dir / "sft" / "config.json", path)
    torch.save(load_file(run_dir / "sft" / "model.safetensors"), path / "pytorch_model.bin")
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
    "ppo_init_pickle_checkpoint": ("pickle",
                                   lambda r, t: ppo_cmd(r, t, init=pickle_policy(r, t))),
    # beyond the list in the task: inputs a user can easily get wrong
    "ppo_out_exists": ("exists", lambda r, t: ppo_cmd(r, t, out=existing_dir(t))),
    "ppo_zero_minibatches": ("minibatches", lambda r, t: ppo_cmd(r, t) + ["--minibatches", "0"]),
    "sft_fewer_examples_than_a_batch": ("", lambda r, t: [
        "sft.py", "--out", t / "out", "--device", "cpu", "--num_examples", "10"]),
    "sft_unknown_device": ("gpu", lambda r, t: ["sft.py", "--out", t / "out", "--device", "gpu"]),
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
