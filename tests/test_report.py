"""The multi-seed report: mean +- standard error over seeds, OCRM minus each control paired by
seed, curves averaged point by point, and `SEEDS=... bash run_all.sh` running one seed after the
other and then the aggregate.

No pipeline runs here: three single-run report.json files are written by hand (the structure
report.build_report produces) and every expected number is computed again in the test, with the
statistics module and NumPy, not with common.mean_std_err. The CLI cases call report.main through
common.run_main in this process (a fresh interpreter would spend seconds importing torch); the
run_all.sh cases use a stand-in PYTHON that only records how it was called. Under 5 s in all:

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_report.py
"""
import json
import math
import os
import statistics
import subprocess
from pathlib import Path

import numpy as np
import pytest

import common as C
import report as R

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_ARMS = ("sft", "standard_rlhf", "ppo_new_kl", "ocrm")
ROUNDS, EPISODES = 3, [0, 64, 128, 192, 256]   # two evaluation points per round after the start
ARMS_FLAG = "standard_rlhf ppo_new_kl ocrm dpo wpo"   # run_all.sh's default ARMS

# Final near-greedy gold of each arm on each seed: OCRM beats standard RLHF on seeds 1 and 3 and
# PPO + new KL on all three.
FINAL_GOLD = {1: {"sft": 3.00, "standard_rlhf": 4.00, "ppo_new_kl": 3.50, "ocrm": 4.25},
              2: {"sft": 3.10, "standard_rlhf": 4.40, "ppo_new_kl": 3.20, "ocrm": 3.90},
              3: {"sft": 2.90, "standard_rlhf": 3.70, "ppo_new_kl": 3.60, "ocrm": 4.10}}
SEEDS = list(FINAL_GOLD)


def synthetic_run_report(seed: int, rounds: int = ROUNDS, episodes=EPISODES) -> dict:
    """A report.json as report.build_report writes it, with numbers that differ by seed and arm."""
    arms = {}
    for i, arm in enumerate(ALL_ARMS):
        points = episodes[:1] if arm == "sft" else episodes
        curve = [{"episodes": e, "kl_to_sft": 0.01 * e * (i + 1) / seed,
                  "proxy": 0.3 + 0.004 * e * seed + 0.1 * i,
                  "gold": 3.0 + 0.002 * e * i - 0.1 * seed, "gold_se": 0.04} for e in points]
        arms[arm] = {"gold": FINAL_GOLD.get(seed, FINAL_GOLD[1])[arm],
                     "gold_se": 0.05 + 0.01 * i + 0.001 * seed,
                     "proxy": 1.0 + 0.2 * i + 0.05 * seed,
                     "kl_to_sft": 0.0 if arm == "sft" else 2.0 * i + seed,
                     "win_rate_vs_sft": 0.5 if arm == "sft" else 0.3 + 0.05 * i + 0.02 * seed,
                     "win_rate_vs_reference": 0.2 + 0.1 * i + 0.01 * seed,
                     "curve": curve}
        if arm != "sft":
            arms[arm]["stage_finals"] = [{"stage": f"round_{k}", "gold": 3.0 + 0.1 * k,
                                          "gold_se": 0.05} for k in range(1, rounds + 1)]
    weights = []
    for k in range(2, rounds + 1):
        # seed 3's round 2 was made without --reward_model_before: no policy-pair accuracy
        accuracy = None if (seed, k) == (3, 2) else \
            {"num_untied_pairs": 600, "before": 0.70 + 0.01 * seed, "after": 0.72 + 0.01 * k}
        weights.append({"round": k, "ess_fraction": 0.9 - 0.1 * k + 0.01 * seed, "min": 0.1,
                        "mean": 0.6, "max": 1.5, "alpha": 0.1, "lam": 0.3, "min_ess": 0.0,
                        "lam_used": 0.3, "normalize": False,
                        "clip": 0.0, "fresh_pairs": 0, "rm_heldout_accuracy": 0.75,
                        "policy_pair_accuracy": accuracy})
    overopt = R.overoptimization(arms["standard_rlhf"]["curve"])
    return {"seed": seed, "rounds": rounds, "arms": arms, "episodes_per_round": 64,
            "weights": weights,
            "held_out_noise": {"ocrm_minus_standard_rlhf": 0.06 + 0.002 * seed,
                               "ocrm_minus_ppo_new_kl": 0.07 + 0.003 * seed},
            "rm_1_heldout_accuracy": 0.76, "overoptimization": {"standard_rlhf": overopt},
            "seconds": {"sft": 40.0, "total": 40.0}}


def write_run(root: Path, report: dict) -> Path:
    run_dir = root / f"toy-seed{report['seed']}"
    run_dir.mkdir(parents=True)
    C.write_json(run_dir / "report.json", report)
    return run_dir


@pytest.fixture
def run_dirs(tmp_path) -> list[Path]:
    return [write_run(tmp_path / "runs", synthetic_run_report(s)) for s in SEEDS]


def mean_and_std_err(xs) -> tuple[float, float]:
    """Independently of common.mean_std_err: statistics.stdev is the sample std (n - 1)."""
    return statistics.mean(xs), statistics.stdev(xs) / math.sqrt(len(xs))


def cli(argv, capsys) -> tuple[int, str, str]:
    """`python report.py ARGV` in this process: exit code, stdout, stderr."""
    try:
        C.run_main(lambda: R.main([str(a) for a in argv]))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------------------------
# The numbers
# ----------------------------------------------------------------------------------------------
def test_held_out_noise_is_averaged_over_seeds_and_stated_next_to_the_differences(run_dirs,
                                                                                 tmp_path):
    agg = R.aggregate_report(run_dirs)
    reports = [synthetic_run_report(s) for s in SEEDS]
    for key in ("ocrm_minus_standard_rlhf", "ocrm_minus_ppo_new_kl"):
        expected = np.mean([r["held_out_noise"][key] for r in reports])
        assert agg["held_out_noise"][key] == pytest.approx(expected, rel=1e-12)
    for arm in ALL_ARMS:
        expected = np.mean([r["arms"][arm]["gold_se"] for r in reports])
        assert agg["held_out_gold_se"][arm] == pytest.approx(expected, rel=1e-12)
    text = R.aggregate_markdown(agg)
    # seed s: OCRM - standard 0.06 + 0.002 s, mean over seeds 1-3: 0.064; arms' gold_se from
    # 0.052 (sft) to 0.082 (ocrm)
    assert ("Held-out set noise in one seed's numbers, mean over seeds (s.e. over the held-out "
            "prompts): each arm's final gold ± 0.052 to 0.082; on the same prompts, OCRM minus "
            "standard RLHF ± 0.064; OCRM minus PPO + new KL ± 0.076.") in text
    # one run's report.md says the same of its own numbers: seed 2, 0.052 to 0.082, 0.064, 0.076
    one = R.markdown(synthetic_run_report(2))
    assert ("Held-out set noise (s.e. over the held-out prompts): each arm's final gold ± 0.052 "
            "to 0.082; on the same prompts, OCRM minus standard RLHF ± 0.064; OCRM minus PPO + "
            "new KL ± 0.076.") in one


def test_each_arm_is_mean_and_standard_error_over_seeds(run_dirs):
    agg = R.aggregate_report(run_dirs)
    assert agg["seeds"] == SEEDS and agg["rounds"] == ROUNDS
    reports = [synthetic_run_report(s) for s in SEEDS]
    for arm in ALL_ARMS:
        for key in ("gold", "proxy", "kl_to_sft", "win_rate_vs_sft", "win_rate_vs_reference"):
            values = [r["arms"][arm][key] for r in reports]
            mean, std_err = mean_and_std_err(values)
            got = agg["arms"][arm][key]
            assert got["per_seed"] == values, (arm, key)
            assert got["mean"] == pytest.approx(mean, rel=1e-12), (arm, key)
            assert got["std_err"] == pytest.approx(std_err, rel=1e-12, abs=1e-15), (arm, key)
    # spelled out once: OCRM's gold is 4.25, 3.90, 4.10
    assert agg["arms"]["ocrm"]["gold"]["mean"] == pytest.approx(12.25 / 3)
    assert agg["arms"]["sft"]["win_rate_vs_sft"]["std_err"] == 0.0


def test_ocrm_minus_control_is_paired_by_seed_with_its_win_count(run_dirs):
    paired = R.aggregate_report(run_dirs)["paired_differences"]
    assert set(paired) == {"ocrm_minus_standard_rlhf", "ocrm_minus_ppo_new_kl"}
    for control, wins in (("standard_rlhf", 2), ("ppo_new_kl", 3)):
        diffs = np.array([FINAL_GOLD[s]["ocrm"] - FINAL_GOLD[s][control] for s in SEEDS])
        got = paired[f"ocrm_minus_{control}"]["gold"]
        assert got["per_seed"] == pytest.approx(diffs.tolist(), rel=1e-12)
        assert got["mean"] == pytest.approx(diffs.mean(), rel=1e-12)
        # the s.e. of the per-seed differences, not a combination of the two arms' s.e.
        assert got["std_err"] == pytest.approx(diffs.std(ddof=1) / math.sqrt(len(diffs)), rel=1e-12)
        assert got["wins"] == wins, control
    # by hand: 0.25, -0.50, 0.40 -> mean 0.05
    assert paired["ocrm_minus_standard_rlhf"]["gold"]["mean"] == pytest.approx(0.05)


def test_curves_are_averaged_point_by_point_over_seeds(run_dirs):
    curves = R.aggregate_report(run_dirs)["curves"]
    assert [p["episodes"] for p in curves["ocrm"]] == EPISODES
    assert [p["episodes"] for p in curves["sft"]] == [0]
    i = 3                                          # episodes 192, in round 3
    points = [synthetic_run_report(s)["arms"]["ppo_new_kl"]["curve"][i] for s in SEEDS]
    gold = np.array([p["gold"] for p in points])
    proxy = np.array([p["proxy"] for p in points])
    got = curves["ppo_new_kl"][i]
    assert set(got) == {"episodes", "gold_mean", "gold_std_err", "proxy_mean", "proxy_std_err",
                        "kl_to_sft_mean"}
    assert got["episodes"] == 192
    assert got["gold_mean"] == pytest.approx(gold.mean(), rel=1e-12)
    assert got["gold_std_err"] == pytest.approx(gold.std(ddof=1) / math.sqrt(3), rel=1e-12)
    assert got["proxy_mean"] == pytest.approx(proxy.mean(), rel=1e-12)
    assert got["proxy_std_err"] == pytest.approx(proxy.std(ddof=1) / math.sqrt(3), rel=1e-12)
    assert got["kl_to_sft_mean"] == pytest.approx(np.mean([p["kl_to_sft"] for p in points]))


def test_per_round_diagnostics_skip_seeds_without_policy_pair_accuracy(run_dirs):
    agg = R.aggregate_report(run_dirs)
    round_2, round_3 = agg["policy_pair_accuracy"]
    assert round_2 == pytest.approx({"round": 2, "num_seeds": 2, "before": (0.71 + 0.72) / 2,
                                     "after": 0.74})
    assert round_3 == pytest.approx({"round": 3, "num_seeds": 3, "before": 0.72, "after": 0.75})
    assert [e["round"] for e in agg["ess_fraction"]] == [2, 3]
    assert agg["ess_fraction"][0]["mean"] == pytest.approx(0.72)      # 0.9 - 0.2 + 0.02
    # the per-seed diagnostics are carried over unchanged
    assert [o["seed"] for o in agg["overoptimization"]] == SEEDS
    assert agg["overoptimization"][1] == \
        {"seed": 2, **synthetic_run_report(2)["overoptimization"]["standard_rlhf"]}
    assert agg["weights"][2] == {"seed": 3, "weights": synthetic_run_report(3)["weights"]}


def test_one_seed_has_a_mean_and_no_standard_error(run_dirs):
    agg = R.aggregate_report(run_dirs[:1])
    assert agg["arms"]["ocrm"]["gold"] == {"mean": 4.25, "std_err": None, "per_seed": [4.25]}
    assert "4.250 |" in R.aggregate_markdown(agg)                     # no "± nan"


# ----------------------------------------------------------------------------------------------
# The files
# ----------------------------------------------------------------------------------------------
def test_cli_writes_report_json_md_and_png_and_leaves_the_runs_alone(run_dirs, tmp_path, capsys):
    out = tmp_path / "toy-aggregate"
    before = {d: (d / "report.json").read_bytes() for d in run_dirs}
    code, stdout, stderr = cli(["--aggregate", *run_dirs, "--out", out], capsys)
    assert (code, stderr) == (0, "")
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "report.json", "report.md"]
    assert json.loads((out / "report.json").read_text()) == R.aggregate_report(run_dirs)
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    text = (out / "report.md").read_text()
    assert stdout == text + "\n"
    assert text.startswith("# OCRM over 3 seeds (1, 2, 3), 3 rounds")
    assert "| OCRM | 4.083 ± 0.101 |" in text               # mean 4.0833, s.e. 0.1014
    assert "| 2 | 3.100 | 4.400 | 3.200 | 3.900 |" in text  # seed 2's finals
    assert "| OCRM | standard RLHF | +0.050 ± 0.278 | 2 of 3 seeds |" in text
    assert "| OCRM | PPO + new KL | +0.650 ± 0.076 | 3 of 3 seeds |" in text
    assert "| 2 | 0.720 ± 0.006 | 0.715 | 0.740 | 2 |" in text
    assert {d: (d / "report.json").read_bytes() for d in run_dirs} == before


def test_missing_report_is_one_error_line(run_dirs, tmp_path, capsys):
    missing = tmp_path / "runs" / "toy-seed4"
    code, stdout, stderr = cli(["--aggregate", *run_dirs, missing, "--out", tmp_path / "agg"],
                               capsys)
    assert code == 2
    assert stderr == f"error: {missing / 'report.json'} does not exist; run run_all.sh for that " \
                     f"seed first\n"
    assert not (tmp_path / "agg").exists()


def different_rounds(root):
    return write_run(root, synthetic_run_report(4, rounds=2)), "2 rounds"


def other_episodes(root):
    return write_run(root, synthetic_run_report(4, episodes=[0, 32, 64, 96, 128])), "episodes"


def seed_again(root):
    return write_run(root / "again", synthetic_run_report(1)), "both seed 1"


def other_lam(root):
    report = synthetic_run_report(4)
    for w in report["weights"]:
        w["lam"] = 0.1
    return write_run(root, report), "lam=0.1"


def not_json(root):
    run_dir = root / "toy-seed4"
    run_dir.mkdir()
    (run_dir / "report.json").write_text('{"seed": 4, "rou')
    return run_dir, "could not read"


@pytest.mark.parametrize("make_run", [different_rounds, other_episodes, seed_again, other_lam,
                                      not_json])
def test_runs_that_cannot_be_averaged_are_one_error_line(run_dirs, tmp_path, capsys, make_run):
    odd_run, must_mention = make_run(tmp_path / "runs")
    with pytest.raises(C.StageError, match=must_mention):
        R.aggregate_report([*run_dirs, odd_run])
    code, _, stderr = cli(["--aggregate", *run_dirs, odd_run, "--out", tmp_path / "agg"], capsys)
    assert code == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error:"), stderr
    assert not (tmp_path / "agg").exists()


def test_out_may_not_be_one_of_the_runs(run_dirs, capsys):
    code, _, stderr = cli(["--aggregate", *run_dirs, "--out", run_dirs[0]], capsys)
    assert code == 2 and stderr.startswith("error: --out") and len(stderr.splitlines()) == 1


@pytest.mark.parametrize("mode", ["--aggregate", "--gates"])
def test_arms_with_several_runs_is_an_error_not_ignored(run_dirs, tmp_path, capsys, mode):
    """--arms says which arms one run directory has; the multi-run modes read them from each
    report.json, so a given --arms would be silently ignored there."""
    out = ["--out", tmp_path / "agg"] if mode == "--aggregate" else []
    code, _, stderr = cli([mode, *run_dirs, *out, "--arms", "ocrm"], capsys)
    assert code == 2 and "--arms" in stderr and "--run_dir" in stderr
    assert not (tmp_path / "agg").exists()


# ----------------------------------------------------------------------------------------------
# run_all.sh with SEEDS (the single-seed behaviour is covered by tests/test_pipeline.py)
# ----------------------------------------------------------------------------------------------
def run_all(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    """bash run_all.sh with a stand-in PYTHON that appends its arguments to calls.log and exits
    0 (or 2 when they contain $FAIL_ON), so only the script's own logic runs."""
    fake_python = tmp_path / "fake_python"
    fake_python.write_text('#!/bin/sh\n'
                           'echo "$*" >> "$CALLS"\n'
                           'echo "${OMP_NUM_THREADS-unset}" >> "$CALLS.threads"\n'
                           'case "$*" in *"$FAIL_ON"*) echo "error: stand-in fails" >&2; exit 2;; '
                           'esac\n')
    fake_python.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("SEED", "SEEDS", "RUN_DIR", "AGG_DIR")}
    env = {**base, "OMP_NUM_THREADS": "1", "PYTHON": str(fake_python), "ROUNDS": "2",
           "RUN_ROOT": str(tmp_path / "root"), "CALLS": str(tmp_path / "calls.log"),
           "FAIL_ON": "never matches", "ARM_JOBS": "1", **env}
    env = {k: v for k, v in env.items() if v is not None}          # None: unset it
    return subprocess.run(["bash", "run_all.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.log").read_text().splitlines()


@pytest.mark.parametrize("env", [{"SEEDS": "1 x"}, {"SEEDS": "0 1"}, {"SEEDS": "1 01"},
                                 {"SEEDS": "1,2"}, {"SEEDS": "2 1 2"}, {"SEEDS": " "},
                                 {"SEEDS": "1 2", "RUN_DIR": "runs/mine"}],
                         ids=lambda env: " ".join(f"{k}={v!r}" for k, v in env.items()))
def test_bad_seeds_are_one_error_line_before_anything_runs(tmp_path, env):
    proc = run_all(tmp_path, **env)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error:"), proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "root").exists() and not (tmp_path / "calls.log").exists()


def test_seeds_run_the_pipeline_once_per_seed_in_turn_then_aggregate(tmp_path):
    root = tmp_path / "root"
    proc = run_all(tmp_path, SEEDS="3 1", SEED="7")          # SEED is ignored when SEEDS is set
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line for line in lines if line.startswith("=== ")] == \
        [f"=== seed 3: {root}/toy-seed3", f"=== seed 1: {root}/toy-seed1",
         f"=== aggregate of 2 seeds: {root}/toy-aggregate"]
    stages = [line for line in lines if line.startswith("== ")]
    assert len(stages) == 2 * 9                              # 9 stages per seed at ROUNDS=2
    assert all(f"{root}/toy-seed3/" in line for line in stages[:9])
    assert all(f"{root}/toy-seed1/" in line for line in stages[9:])
    log = calls(tmp_path)
    assert log[0].startswith("sft.py") and "--seed 3" in log[0]
    assert [c for c in log if c.startswith("report.py")] == [
        f"report.py --run_dir {root}/toy-seed3 --rounds 2 --seed 3 --arms {ARMS_FLAG}",
        f"report.py --run_dir {root}/toy-seed1 --rounds 2 --seed 1 --arms {ARMS_FLAG}",
        f"report.py --aggregate {root}/toy-seed3 {root}/toy-seed1 --out {root}/toy-aggregate",
        f"report.py --gates {root}/toy-seed3 {root}/toy-seed1"]

    proc = run_all(tmp_path, SEEDS="1", AGG_DIR=str(tmp_path / "elsewhere"))
    assert proc.returncode == 0, proc.stderr
    assert calls(tmp_path)[-2:] == [
        f"report.py --aggregate {root}/toy-seed1 --out {tmp_path}/elsewhere",
        f"report.py --gates {root}/toy-seed1"]
    assert (tmp_path / "elsewhere" / "gates.md").is_file()


def test_a_failing_seed_stops_before_the_next_seed_and_the_aggregate(tmp_path):
    proc = run_all(tmp_path, SEEDS="1 2 3", FAIL_ON="toy-seed2/rm_1")
    assert proc.returncode == 2
    assert proc.stderr == "error: stand-in fails\n"
    log = calls(tmp_path)
    assert "toy-seed2/rm_1" in log[-1]
    assert not any("toy-seed3" in c or "--aggregate" in c for c in log)


# ----------------------------------------------------------------------------------------------
# The gates of docs/experiments.md
# ----------------------------------------------------------------------------------------------
def gate_run(root: Path, seed: int, standard_finals, overopt, gold: dict) -> Path:
    """A report.json with the two fresh-pairs controls, and the numbers the gates read set by
    hand."""
    report = synthetic_run_report(seed)
    report["arms"]["fresh_pairs"] = dict(report["arms"]["ocrm"])
    report["arms"]["fresh_plus_stored"] = dict(report["arms"]["ocrm"])
    report["arms"]["sft"].update(gold=1.0, gold_se=0.1)
    report["arms"]["standard_rlhf"]["stage_finals"] = [
        {"stage": f"round_{k + 1}", "gold": g, "gold_se": 0.1} for k, g in enumerate(standard_finals)]
    report["overoptimization"]["standard_rlhf"] = overopt
    for arm, g in gold.items():
        report["arms"][arm]["gold"] = g
    return write_run(root, report)


def test_gates_follow_their_definitions(tmp_path, capsys):
    peak = {"peak_gold": 2.0, "final_gold": 1.5, "peak_gold_se": 0.1, "peak_episodes": 64,
            "proxy_at_peak": 1.0, "final_proxy": 1.3, "gold_drop_from_peak": 0.5,
            "proxy_gain_after_peak": 0.3}
    flat = {**peak, "final_gold": 1.8, "gold_drop_from_peak": 0.2}          # 2 s.e.: too little
    # fresh pairs minus standard: 0.5, 0.7, 0.6; fresh + stored minus standard -0.1, 0.3, 0.1;
    # OCRM minus standard 0.2, -0.1, 0.3; OCRM minus PPO + new KL 1.0, 1.1, 0.9; OCRM minus
    # SFT (1.0) 0.7, 0.5, 0.9
    golds = {1: {"standard_rlhf": 1.5, "fresh_pairs": 2.0, "fresh_plus_stored": 1.4, "ocrm": 1.7,
                 "ppo_new_kl": 0.7},
             2: {"standard_rlhf": 1.6, "fresh_pairs": 2.3, "fresh_plus_stored": 1.9, "ocrm": 1.5,
                 "ppo_new_kl": 0.4},
             3: {"standard_rlhf": 1.6, "fresh_pairs": 2.2, "fresh_plus_stored": 1.7, "ocrm": 1.9,
                 "ppo_new_kl": 1.0}}
    dirs = [gate_run(tmp_path / "a", 1, [1.8, 1.4, 1.2], peak, golds[1]),     # +8 s.e.
            gate_run(tmp_path / "a", 2, [1.2, 1.6, 1.1], peak, golds[2]),     # +6 s.e., round 2
            gate_run(tmp_path / "a", 3, [1.3, 1.2, 1.55], flat, golds[3])]    # +5.5 s.e.
    g = R.gates(dirs)
    assert [(x["best"], x["best_stage"]) for x in g[1]["per_seed"]] == \
        [(1.8, "round_1"), (1.6, "round_2"), (1.55, "round_3")]
    assert [x["margin_se"] for x in g[1]["per_seed"]] == pytest.approx([8.0, 6.0, 5.5])
    assert g[1]["passed"]
    assert [x["drop_se"] for x in g[2]["per_seed"]] == pytest.approx([5.0, 5.0, 2.0])
    assert not g[2]["passed"]                                  # seed 3 falls by 2 s.e. only
    d3 = g[3]["differences"]["standard_rlhf"]
    assert d3["per_seed"] == pytest.approx([0.5, 0.7, 0.6])
    assert d3["std_err"] == pytest.approx(np.std([0.5, 0.7, 0.6], ddof=1) / math.sqrt(3))
    assert g[3]["passed"]                                      # 0.6 > 2 x 0.058
    d3b = g["3b"]["differences"]["standard_rlhf"]
    assert d3b["per_seed"] == pytest.approx([-0.1, 0.3, 0.1]) and d3b["wins"] == 2
    assert d3b["std_err"] == pytest.approx(0.2 / math.sqrt(3))
    assert not g["3b"]["passed"]                               # 0.1 < 2 x 0.115
    d4 = g[4]["differences"]
    assert d4["standard_rlhf"]["mean"] == pytest.approx(0.4 / 3)
    assert d4["standard_rlhf"]["std_err"] == pytest.approx(
        np.std([0.2, -0.1, 0.3], ddof=1) / math.sqrt(3))       # 0.120: 1.1 s.e.
    assert d4["ppo_new_kl"]["mean"] == pytest.approx(1.0)
    assert g[4]["minus_sft"]["per_seed"] == pytest.approx([0.7, 0.5, 0.9])
    assert not g[4]["passed"]                                  # not 2 s.e. above standard RLHF
    # a seed 0.1 short of 5 s.e. fails gate 1
    short = gate_run(tmp_path / "b", 3, [1.3, 1.2, 1.49], peak, golds[3])
    assert not R.gates(dirs[:2] + [short])[1]["passed"]
    # the command prints one table, gate 3b only when its control ran; gates whose arms were not
    # run say so
    code, out, err = cli(["--gates", *dirs], capsys)
    line = next(x for x in out.splitlines() if x.startswith("| 3b fresh + stored pairs control"))
    assert (code, err) == (0, "") and line.endswith("| FAIL |") and "-0.10, +0.30, +0.10" in line
    for r in dirs:
        report = json.loads((r / "report.json").read_text())
        for arm in ("fresh_pairs", "fresh_plus_stored", "ocrm", "ppo_new_kl"):
            del report["arms"][arm]
        C.write_json(r / "report.json", report)
    code, out, err = cli(["--gates", *dirs], capsys)
    assert (code, err) == (0, "")
    assert "| 1 RLHF beats SFT by > 5 s.e. |" in out and out.count("| pass |") == 1
    assert out.count("| not run | - |") == 2 and "| FAIL |" in out


# ----------------------------------------------------------------------------------------------
# run_all.sh with ARMS
# ----------------------------------------------------------------------------------------------
def test_arm_jobs_run_the_arms_side_by_side_each_into_its_log(tmp_path):
    """ARM_JOBS=2: after ppo_1 two arms run at once (both round-2 stages start before either
    ends), each arm's stage lines go to RUN_DIR/ARM.log, every stage runs on one torch thread
    (OMP_NUM_THREADS unset before), and the report comes after all of them."""
    run_dir, events = tmp_path / "one", tmp_path / "events"
    slow = tmp_path / "slow_python"
    slow.write_text('#!/bin/sh\necho "$*" >> "$CALLS"\necho "${OMP_NUM_THREADS-unset}" >> '
                    '"$CALLS.threads"\ncase "$*" in *round_2*) echo start >> "$EVENTS"; sleep 2; '
                    'echo end >> "$EVENTS";; esac\n')
    slow.chmod(0o755)
    proc = run_all(tmp_path, RUN_DIR=str(run_dir), ARM_JOBS="2", OMP_NUM_THREADS=None,
                   ARMS="standard_rlhf ppo_new_kl", PYTHON=str(slow), EVENTS=str(events))
    assert proc.returncode == 0, proc.stderr
    assert events.read_text().split() == ["start", "start", "end", "end"]
    assert [x for x in proc.stdout.splitlines() if x.startswith("== ")] == [
        f"== {run_dir}/{s}" for s in ("sft", "rm_1", "ppo_1")] + [
        f"== arm {arm} (output in {run_dir}/{arm}.log)" for arm in ("standard_rlhf", "ppo_new_kl")]
    for arm in ("standard_rlhf", "ppo_new_kl"):
        assert (run_dir / f"{arm}.log").read_text() == f"== {run_dir}/{arm}/round_2\n"
    assert set((tmp_path / "calls.log.threads").read_text().split()) == {"1"}
    assert calls(tmp_path)[-1].startswith(f"report.py --run_dir {run_dir}")
    assert not list(run_dir.glob("*.done"))


def test_a_failing_arm_among_side_by_side_arms_stops_before_the_report(tmp_path):
    run_dir = tmp_path / "one"
    proc = run_all(tmp_path, RUN_DIR=str(run_dir), ARM_JOBS="2", ARMS="standard_rlhf ocrm dpo",
                   FAIL_ON="ocrm/rm_2")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: the arm ocrm failed; its last lines, from "
                                  f"{run_dir}/ocrm.log:\n"), proc.stderr
    assert "error: stand-in fails" in proc.stderr
    # the longest arm starts first: refits and PPO, then PPO alone, then the offline stage
    assert [x.split()[2] for x in proc.stdout.splitlines() if x.startswith("== arm ")] == [
        "ocrm", "standard_rlhf", "dpo"]
    log = calls(tmp_path)
    assert any(f"--out {run_dir}/standard_rlhf/round_2" in c for c in log)   # the others ran
    assert any(c.startswith("dpo.py") for c in log)
    assert not any(c.startswith("report.py") for c in log)
    assert not any(f"--out {run_dir}/ocrm/round_2" in c for c in log)


@pytest.mark.parametrize("env, side_by_side", [({}, True), ({"PRESET": "smoke"}, False),
                                               ({"NPROC": "2"}, False), ({"ARM_JOBS": "3"}, True)])
def test_arms_run_side_by_side_by_default_on_the_embedded_task_only(tmp_path, env, side_by_side):
    proc = run_all(tmp_path, RUN_DIR=str(tmp_path / "one"), ARMS="standard_rlhf ocrm",
                   **{"ARM_JOBS": None, **env})
    assert proc.returncode == 0, proc.stderr
    assert ("== arm ocrm (output in" in proc.stdout) == side_by_side


def test_arms_run_only_the_arms_asked_for_each_round_after_round_1(tmp_path):
    run_dir = tmp_path / "one"
    proc = run_all(tmp_path, ROUNDS="3", RUN_DIR=str(run_dir), ARMS="fresh_pairs standard_rlhf",
                   FRESH_PAIRS="500", OCRM_ARGS="--lam 0.7")
    assert proc.returncode == 0, proc.stderr
    stages = [line[3:] for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert stages == [f"{run_dir}/{s}" for s in (
        "sft", "rm_1", "ppo_1", "fresh_pairs/rm_2", "fresh_pairs/round_2", "fresh_pairs/rm_3",
        "fresh_pairs/round_3", "standard_rlhf/round_2", "standard_rlhf/round_3")]
    log = calls(tmp_path)
    refit_3 = next(c for c in log if f"--out {run_dir}/fresh_pairs/rm_3" in c)
    # the control refits on pi_2 of its own arm, with new pairs and not the OCRM weight flags
    assert f"--policy {run_dir}/fresh_pairs/round_2" in refit_3
    assert f"--reward_model_before {run_dir}/fresh_pairs/rm_2" in refit_3
    assert refit_3.endswith("--fresh_pairs 500") and "--lam" not in refit_3
    ppo_3 = next(c for c in log if f"--out {run_dir}/fresh_pairs/round_3" in c)
    assert (f"--init {run_dir}/fresh_pairs/round_2 --kl_ref {run_dir}/fresh_pairs/round_2 "
            f"--reward_model {run_dir}/fresh_pairs/rm_3") in ppo_3
    std_3 = next(c for c in log if f"--out {run_dir}/standard_rlhf/round_3" in c)
    assert f"--kl_ref {run_dir}/sft --reward_model {run_dir}/rm_1" in std_3
    assert log[-1] == (f"report.py --run_dir {run_dir} --rounds 3 --seed 1 "
                       f"--arms fresh_pairs standard_rlhf")


@pytest.mark.parametrize("arms", ["standard_rlhf ppo", "ocrm ocrm", " "])
def test_bad_arms_are_one_error_line_before_anything_runs(tmp_path, arms):
    proc = run_all(tmp_path, RUN_DIR=str(tmp_path / "one"), ARMS=arms)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error:"), proc.stderr
    assert not (tmp_path / "calls.log").exists()


def test_jobs_run_seeds_side_by_side_on_one_thread_each_and_a_failure_stops_the_aggregate(tmp_path):
    root = tmp_path / "root"
    proc = run_all(tmp_path, SEEDS="1 2 3", JOBS="2", OMP_NUM_THREADS="")
    assert proc.returncode == 0, proc.stderr
    for s in (1, 2, 3):                      # each seed's output went to its own log
        assert "== " in (root / f"toy-seed{s}.log").read_text()
    log = calls(tmp_path)
    assert sum(c.startswith("sft.py") for c in log) == 3
    assert set((tmp_path / "calls.log.threads").read_text().split()) == {"1"}
    assert log[-2].startswith("report.py --aggregate") and log[-1].startswith("report.py --gates")
    proc = run_all(tmp_path, SEEDS="1 2 3", JOBS="2", FAIL_ON="toy-seed2/rm_1")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {root}/toy-seed2 failed")
    assert not calls(tmp_path)[-1].startswith("report.py --gates")
