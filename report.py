"""Collect one run directory into report.json, report.md and curves.png; average several seeds'
reports into one; or judge runs against the demo's gates.

One run (--run_dir): reads what the stages wrote (eval.jsonl / final.json of every PPO stage,
settings.json of every weights dataset, the *_info.json timings) and stitches each arm's rounds
into one curve whose `episodes` count from the start of round 1. Nothing is recomputed.

Several seeds (--aggregate): reads each run's report.json and writes, into --out, every arm's
final numbers as mean +- standard error over seeds (s.e. = sample std / sqrt(n)), each
comparison (OCRM minus each control, the fresh-pairs control minus standard RLHF) paired by seed
(the seeds share nothing else, so the paired difference is the comparison to trust), the curves
averaged point by point, and the per-round refit diagnostics.

Gates (--gates): the four checks a variant of the embedded task must pass, in order, to teach the
paper (docs/experiments.md): 1 RLHF beats SFT, 2 standard RLHF overoptimizes, 3 the on-policy
control beats standard RLHF, 4 OCRM beats both controls and SFT. Prints one table.

    python report.py --run_dir runs/toy-seed1 --rounds 3 --seed 1
    python report.py --aggregate runs/toy-seed1 runs/toy-seed2 runs/toy-seed3 \\
        --out runs/toy-aggregate
    python report.py --gates runs/toy-seed1 runs/toy-seed2
"""
import argparse
import json
import os
from pathlib import Path

import common as C

ALL_ARMS = ("standard_rlhf", "ppo_new_kl", "ocrm", "dpo", "wpo", "fresh_pairs",
            "fresh_plus_stored")
DEFAULT_ARMS = ("standard_rlhf", "ppo_new_kl", "ocrm", "dpo", "wpo")
OFFLINE_ARMS = ("dpo", "wpo")                     # one dpo.py stage on the stored pairs, no rounds
CONTROL_ARMS = ("fresh_pairs", "fresh_plus_stored")  # refit on new gold-labelled pairs, not weights
# (arm, control): the differences reported, whenever both arms were run
COMPARISONS = (("ocrm", "standard_rlhf"), ("ocrm", "ppo_new_kl"), ("ocrm", "dpo"),
               ("ocrm", "wpo"), ("fresh_pairs", "standard_rlhf"),
               ("fresh_plus_stored", "standard_rlhf"))
LABELS = {"sft": "SFT", "standard_rlhf": "standard RLHF", "ppo_new_kl": "PPO + new KL",
          "ocrm": "OCRM", "dpo": "DPO", "wpo": "WPO", "fresh_pairs": "fresh-pairs control",
          "fresh_plus_stored": "fresh + stored pairs control"}
# what the final evaluation reports per arm (final.json), in report.json and the aggregate
FINAL_KEYS = ("gold", "proxy", "kl_to_sft", "win_rate_vs_sft", "win_rate_vs_reference")
GATE_SE = {1: 5, 2: 3, 3: 2, "3b": 2, 4: 2}      # how many standard errors each gate asks for


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--run_dir", help="run directory written by run_all.sh (one seed)")
    mode.add_argument("--aggregate", nargs="+", metavar="RUN_DIR",
                      help="run directories of several seeds, each with its report.json")
    mode.add_argument("--gates", nargs="+", metavar="RUN_DIR",
                      help="run directories of several seeds, each with its report.json: print "
                           "the four gates of docs/experiments.md")
    p.add_argument("--rounds", type=int, help="number of rounds (ROUNDS); with --run_dir")
    p.add_argument("--seed", type=int,
                   help="the run's seed, recorded in the report; with --run_dir")
    p.add_argument("--arms", nargs="+", choices=ALL_ARMS, default=None,
                   help="the arms the run has (ARMS of run_all.sh; unset: "
                        f"{' '.join(DEFAULT_ARMS)}); with --run_dir")
    p.add_argument("--out", help="with --aggregate: directory for the aggregate report")
    args = p.parse_args(argv)
    if args.run_dir is not None:
        missing = [f"--{name}" for name in ("rounds", "seed") if getattr(args, name) is None]
        if missing:
            p.error(f"the following arguments are required: {', '.join(missing)}")
        if args.out is not None:
            p.error("--out goes with --aggregate; --run_dir writes into the run directory")
        args.arms = args.arms or list(DEFAULT_ARMS)
    else:
        if (args.aggregate is None) != (args.out is None):
            p.error("--aggregate needs --out, and --out goes with --aggregate only")
        if args.rounds is not None or args.seed is not None or args.arms is not None:
            p.error("--rounds, --seed and --arms go with --run_dir; --aggregate and --gates "
                    "read them from each report.json")
    return args


def stage_dirs(run_dir: Path, arm: str, rounds: int) -> list[Path]:
    """The stages an arm's numbers come from, in order: round 1 (shared) and its rounds 2..K, or
    the one dpo.py stage of an offline arm (its curve's `episodes` are pairs seen)."""
    if arm in OFFLINE_ARMS:
        return [run_dir / arm]
    return [run_dir / "ppo_1"] + [run_dir / arm / f"round_{k}" for k in range(2, rounds + 1)]


def read_final(d: Path) -> dict:
    if not (d / "final.json").is_file():
        raise C.StageError(f"{d} is missing or unfinished; run run_all.sh first")
    return json.loads((d / "final.json").read_text())


def arm_report(dirs: list[Path]) -> dict:
    """Final numbers of the last round, each round's final gold, and the curve over all rounds
    (episodes cumulative)."""
    curve, offset, stage_finals = [], 0, []
    for i, d in enumerate(dirs):
        final = read_final(d)
        stage_finals.append({"stage": f"round_{i + 1}", "gold": final["gold"],
                             "gold_se": final["gold_se"]})
        points = C.read_jsonl(d / "eval.jsonl")
        for p in points[1 if i else 0:]:      # a round's first point is the previous round's last
            curve.append({"episodes": offset + p["episodes"], "kl_to_sft": p["kl_to_sft"],
                          "proxy": p["proxy"], "gold": p["gold"], "gold_se": p["gold_se"]})
        offset += points[-1]["episodes"]
    return {**{k: final[k] for k in FINAL_KEYS}, "gold_se": final["gold_se"],
            "stage_finals": stage_finals, "curve": curve}


def held_out_noise(dirs: dict[str, Path]) -> dict:
    """The held-out set's own noise on each comparison: s.e. over prompts of the per-prompt
    difference arm minus control (final gold, same prompts, same order)."""
    per_prompt = {arm: read_final(d)["gold_per_prompt"] for arm, d in dirs.items()}
    if len({len(gold) for gold in per_prompt.values()}) > 1:
        raise C.StageError(f"the arms' last rounds ({', '.join(map(str, dirs.values()))}) were "
                           f"evaluated on different numbers of held-out prompts; run every arm "
                           f"with the same --eval_prompts (run_all.sh: EVAL_PROMPTS)")
    return {f"{arm}_minus_{control}": C.std_err_or_none(
                [a - b for a, b in zip(per_prompt[arm], per_prompt[control])])
            for arm, control in COMPARISONS if arm in dirs and control in dirs}


def overoptimization(curve: list[dict]) -> dict:
    """Where the gold curve peaks, and how gold and proxy end relative to that peak."""
    peak = max(curve, key=lambda p: p["gold"])
    return {"peak_gold": peak["gold"], "peak_episodes": peak["episodes"],
            "peak_gold_se": peak["gold_se"],
            "proxy_at_peak": peak["proxy"], "final_gold": curve[-1]["gold"],
            "final_proxy": curve[-1]["proxy"],
            "gold_drop_from_peak": peak["gold"] - curve[-1]["gold"],
            "proxy_gain_after_peak": curve[-1]["proxy"] - peak["proxy"]}


def stage_seconds(run_dir: Path) -> dict:
    seconds = {}
    for info in sorted(p for name in ("sft_info.json", "rm_info.json", "ppo_info.json",
                                      "dpo_info.json")
                       for p in run_dir.rglob(name)):
        if info.parent.name.startswith("."):
            continue
        seconds[str(info.parent.relative_to(run_dir))] = round(json.loads(info.read_text())["seconds"], 1)
    seconds["total"] = round(sum(seconds.values()), 1)
    return seconds


def refits(run_dir: Path, arm: str, rounds: int) -> list[dict]:
    """Per round of a refitting arm: the weights (all 1 for the fresh-pairs control) and how well
    the refitted RM ranks pairs."""
    rows = []
    for k in range(2, rounds + 1):
        settings = json.loads((run_dir / arm / f"weights_{k}" / "settings.json").read_text())
        rm_info = json.loads((run_dir / arm / f"rm_{k}" / "rm_info.json").read_text())
        d = settings["diagnostics"]
        rows.append({"round": k, "ess_fraction": d["ess_fraction"], "min": d["min"],
                     "mean": d["mean"], "max": d["max"], "alpha": settings["alpha"],
                     "lam": settings["lam"], "min_ess": settings["min_ess"],
                     # the temper the weights were made with (below lam when min_ess lowered it)
                     "lam_used": d["lam_used"], "normalize": settings["normalize"],
                     "clip": settings["clip"],
                     # > 0: the control that refits on new pairs from the policy, not OCRM
                     "fresh_pairs": settings["fresh_pairs"],
                     "rm_heldout_accuracy": rm_info["heldout_accuracy"],
                     # pairwise accuracy vs gold on fresh samples of the policy being corrected
                     "policy_pair_accuracy": rm_info.get("policy_pair_accuracy")})
    return rows


def build_report(run_dir: Path, rounds: int, seed: int, arms=DEFAULT_ARMS) -> dict:
    first = read_final(run_dir / "ppo_1")
    start = C.read_jsonl(run_dir / "ppo_1" / "eval.jsonl")
    sft_point = {k: start[0][k] for k in ("episodes", "kl_to_sft", "proxy", "gold", "gold_se")}
    report_arms = {"sft": {"gold": first["sft"]["gold"], "gold_se": first["sft"]["gold_se"],
                           "proxy": first["sft"]["proxy"], "kl_to_sft": 0.0,
                           "win_rate_vs_sft": 0.5,
                           "win_rate_vs_reference": first["sft"]["win_rate_vs_reference"],
                           "curve": [sft_point]}}
    for arm in arms:
        report_arms[arm] = arm_report(stage_dirs(run_dir, arm, rounds))
    rm_1 = json.loads((run_dir / "rm_1" / "rm_info.json").read_text())
    noise = held_out_noise({arm: stage_dirs(run_dir, arm, rounds)[-1] for arm in arms})
    report = {"seed": seed, "rounds": rounds, "arms": report_arms,
              "episodes_per_round": start[-1]["episodes"],
              "weights": refits(run_dir, "ocrm", rounds) if "ocrm" in arms else [],
              "held_out_noise": noise,
              "rm_1_heldout_accuracy": rm_1["heldout_accuracy"],
              "overoptimization": {"standard_rlhf": overoptimization(
                  report_arms["standard_rlhf"]["curve"])} if "standard_rlhf" in arms else {},
              "seconds": stage_seconds(run_dir)}
    for arm in CONTROL_ARMS:
        if arm in arms:
            report[f"{arm}_refits"] = refits(run_dir, arm, rounds)
    return report


def fresh_pairs_note(weights: list[dict]) -> list[str]:
    """report.md says so when the `ocrm` arm is ocrm_correct.py's --fresh_pairs control."""
    n = max([w["fresh_pairs"] for w in weights], default=0)
    return [f"**The `ocrm` arm here is the fresh-pairs control, not OCRM**: each refit used {n} "
            f"new gold-labelled pairs sampled from the current policy, unweighted.", ""] if n else []


def noise_lines(gold_se: list, noise: dict | None, of_what: str) -> list[str]:
    """One sentence on the held-out set's own noise."""
    if not noise or None in gold_se or None in noise.values():
        return []
    pairs = "; ".join(f"{LABELS[a]} minus {LABELS[b]} ± {noise[f'{a}_minus_{b}']:.3f}"
                      for a, b in COMPARISONS if f"{a}_minus_{b}" in noise)
    return ["", f"Held-out set noise{of_what} (s.e. over the held-out prompts): each arm's final "
                f"gold ± {min(gold_se):.3f} to {max(gold_se):.3f}; on the same prompts, {pairs}."]


def refit_table(rows: list[dict], arm: str, held_out_what: str) -> list[str]:
    lines = ["", f"Per {LABELS[arm]} round: the weights, and how well the RM ranks fresh pairs "
             "sampled from the policy being corrected (accuracy vs gold, ties left out), before "
             "and after the refit.", "",
             f"| {LABELS[arm]} round | lam | ESS / N | min w | mean w | max w | held-out acc "
             f"({held_out_what}) | policy-pair acc before | after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for w in rows:
        acc = w["policy_pair_accuracy"] or {}
        before, after = (f"{acc[k]:.3f}" if k in acc else "-" for k in ("before", "after"))
        lam = "-" if w["lam_used"] is None else f"{w['lam_used']:.3g}"
        lines.append(f"| {w['round']} | {lam} | {w['ess_fraction']:.3f} | {w['min']:.3g} "
                     f"| {w['mean']:.3g} | {w['max']:.3g} | {w['rm_heldout_accuracy']:.3f} "
                     f"| {before} | {after} |")
    return lines


FINAL_HEADER = ["| arm | gold | proxy | KL to SFT | gold win rate vs SFT | vs reference |",
                "|---|---|---|---|---|---|"]


def markdown(report: dict) -> str:
    note = fresh_pairs_note(report["weights"])
    lines = [f"# OCRM run, seed {report['seed']}, {report['rounds']} rounds", "", *note,
             "Final evaluation on the fixed held-out prompts (near-greedy decode, T = 0.01); "
             "KL to SFT from T = 0.7 samples. `proxy` is each arm's own last reward model.", "",
             *FINAL_HEADER]
    for arm, r in report["arms"].items():
        lines.append(f"| {LABELS[arm]} | {r['gold']:.3f} | {r['proxy']:.3f} | {r['kl_to_sft']:.2f} "
                     f"| {r['win_rate_vs_sft']:.3f} | {r['win_rate_vs_reference']:.3f} |")
    lines += noise_lines([r["gold_se"] for r in report["arms"].values()],
                         report["held_out_noise"], "")
    o = report["overoptimization"].get("standard_rlhf")
    if o:
        lines += ["", f"Standard RLHF gold peaked at {o['peak_gold']:.3f} after "
                  f"{o['peak_episodes']} episodes and ended at {o['final_gold']:.3f} (T = 0.7 "
                  f"samples); its proxy went {o['proxy_at_peak']:.3f} -> {o['final_proxy']:.3f} "
                  f"over the same span."]
    lines += ["", f"RM_1 held-out pair accuracy: {report['rm_1_heldout_accuracy']:.3f}"]
    if report["weights"]:
        lines += refit_table(report["weights"], "ocrm",
                             "its own fresh pairs" if note else "SFT pairs")
    for arm, pairs in zip(CONTROL_ARMS, ("its own fresh pairs", "stored and fresh pairs")):
        if report.get(f"{arm}_refits"):
            lines += refit_table(report[f"{arm}_refits"], arm, pairs)
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["seconds"].items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The figure: gold and proxy against episodes, with the rounds marked and the SFT policy's level;
# gold against KL to SFT as points with a binned mean per arm
# ----------------------------------------------------------------------------------------------
def binned_mean(xs: list[float], ys: list[float], bins: int = 8):
    """(x, y) means of `bins` groups of points of equal count, ordered by x: a line that follows
    gold as KL grows, where joining the points in time order would cross itself."""
    pts = sorted(zip(xs, ys))
    size = max(1, len(pts) // bins)
    groups = [pts[i:i + size] for i in range(0, len(pts), size)]
    return ([sum(x for x, _ in g) / len(g) for g in groups],
            [sum(y for _, y in g) / len(g) for g in groups])


def draw(curves: dict, sft_gold: float, episodes_per_round: int, rounds: int, path: Path,
         title: str, kl_label: str) -> None:
    """curves: arm -> {"episodes", "gold", "gold_se" (or None), "proxy", "proxy_se", "kl"} lists."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = dict(zip(ALL_ARMS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for arm, c in curves.items():
        colour = colours[arm]
        if arm in OFFLINE_ARMS:     # trained on pairs, not episodes: only gold against KL
            axes[2].plot(c["kl"], c["gold"], "s--", ms=4, color=colour, label=f"{LABELS[arm]} "
                         "(offline: its evaluations in training order)")
            continue
        for ax, y, se in ((axes[0], c["gold"], c["gold_se"]), (axes[1], c["proxy"], c["proxy_se"])):
            ax.plot(c["episodes"], y, color=colour, label=LABELS[arm])
            if se is not None:
                ax.fill_between(c["episodes"], [m - s for m, s in zip(y, se)],
                                [m + s for m, s in zip(y, se)], color=colour, alpha=0.2)
        axes[2].scatter(c["kl"], c["gold"], s=8, alpha=0.35, color=colour)
        axes[2].plot(*binned_mean(c["kl"], c["gold"]), "o-", ms=3, color=colour,
                     label=LABELS[arm])
    for ax in axes[:2]:
        for k in range(1, rounds):                                  # round boundaries
            ax.axvline(k * episodes_per_round, color="0.6", lw=0.8, ls=":")
    for ax in (axes[0], axes[2]):
        ax.axhline(sft_gold, color="k", lw=0.8, ls="--", label="SFT policy")
    for ax, (x, y) in zip(axes, (("episodes (dotted: round boundaries)", "gold reward"),
                                 ("episodes (dotted: round boundaries)", "proxy reward (own RM)"),
                                 (kl_label, "gold reward (points; line: binned mean)"))):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(report: dict, path: Path) -> None:
    curves = {}
    for arm, r in report["arms"].items():
        if arm == "sft":
            continue
        c = r["curve"]
        curves[arm] = {"episodes": [p["episodes"] for p in c], "gold": [p["gold"] for p in c],
                       "gold_se": None, "proxy": [p["proxy"] for p in c], "proxy_se": None,
                       "kl": [p["kl_to_sft"] for p in c]}
    draw(curves, report["arms"]["sft"]["curve"][0]["gold"], report["episodes_per_round"],
         report["rounds"], path, f"seed {report['seed']}: held-out prompts, T = 0.7 samples",
         "KL to SFT")


def plot_aggregate(agg: dict, path: Path) -> None:
    curves = {}
    for arm, c in agg["curves"].items():
        if arm == "sft":
            continue
        gold_se = [p["gold_std_err"] for p in c]
        proxy_se = [p["proxy_std_err"] for p in c]
        curves[arm] = {"episodes": [p["episodes"] for p in c],
                       "gold": [p["gold_mean"] for p in c],
                       "gold_se": None if None in gold_se else gold_se,
                       "proxy": [p["proxy_mean"] for p in c],
                       "proxy_se": None if None in proxy_se else proxy_se,
                       "kl": [p["kl_to_sft_mean"] for p in c]}
    draw(curves, agg["curves"]["sft"][0]["gold_mean"], agg["episodes_per_round"], agg["rounds"],
         path, f"mean ± s.e. over {len(agg['seeds'])} seeds: held-out prompts, T = 0.7 samples",
         "KL to SFT (mean over seeds)")


# ----------------------------------------------------------------------------------------------
# Several seeds: mean +- standard error over the runs' report.json files
# ----------------------------------------------------------------------------------------------
def read_run_report(run_dir: Path) -> dict:
    path = run_dir / "report.json"
    if not path.is_file():
        raise C.StageError(f"{path} does not exist; run run_all.sh for that seed first")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise C.StageError(f"could not read {path}: {str(e).splitlines()[0]}")


def over_seeds(values: list[float]) -> dict:
    """mean and s.e. = std(ddof=1) / sqrt(n) of one number across seeds (s.e. None for n = 1)."""
    return {"mean": sum(values) / len(values), "std_err": C.std_err_or_none(values),
            "per_seed": list(values)}


def mean_or_none(values: list[float]) -> float | None:
    """The mean of the values there are (None if there are none)."""
    return sum(values) / len(values) if values else None


def weight_settings(report: dict) -> list[str]:
    keys = ("alpha", "lam", "min_ess", "normalize", "clip", "fresh_pairs")
    return [" ".join(f"{k}={w[k]}" for k in keys) for w in report["weights"]]


def check_same_setup(run_dirs: list[Path], reports: list[dict]) -> None:
    """Averaging needs one seed per run, the same arms and rounds, the same evaluation points and
    the same OCRM weight settings (the other stages' flags are not in report.json: keep them the
    same)."""
    first_dir, first = run_dirs[0], reports[0]
    seen = {}
    for d, r in zip(run_dirs, reports):
        if r["seed"] in seen:
            raise C.StageError(f"{seen[r['seed']]} and {d} are both seed {r['seed']}; "
                               f"aggregate one run per seed")
        seen[r["seed"]] = d
        if list(r["arms"]) != list(first["arms"]):
            raise C.StageError(f"{d} has the arms {list(r['arms'])} but {first_dir} has "
                               f"{list(first['arms'])}; run every seed with the same ARMS")
        if r["rounds"] != first["rounds"]:
            raise C.StageError(f"{d} has {r['rounds']} rounds but {first_dir} has "
                               f"{first['rounds']}; run every seed with the same ROUNDS")
        for arm in r["arms"]:
            episodes = [p["episodes"] for p in r["arms"][arm]["curve"]]
            if episodes != [p["episodes"] for p in first["arms"][arm]["curve"]]:
                raise C.StageError(f"{d} evaluated {arm} at other episodes than {first_dir}; run "
                                   f"every seed with the same UPDATES and PPO_ARGS")
        if weight_settings(r) != weight_settings(first):
            raise C.StageError(f"{d} made its OCRM weights with {weight_settings(r)[0]} but "
                               f"{first_dir} with {weight_settings(first)[0]}; run every seed "
                               f"with the same OCRM_ARGS")


def paired(reports: list[dict], arm: str, control: str) -> dict:
    """d_s = gold_arm(s) - gold_control(s): mean +- s.e. over seeds, and how many are > 0."""
    diffs = [r["arms"][arm]["gold"] - r["arms"][control]["gold"] for r in reports]
    return {**over_seeds(diffs), "wins": sum(d > 0 for d in diffs)}


def refit_rounds(reports: list[dict], key: str) -> tuple[list[dict], list[dict]]:
    """Per refit round: mean ESS, and the RM's accuracy on fresh policy pairs before/after the
    refit (mean over the seeds that have it; runs made without --reward_model_before do not)."""
    per_round, accuracy = [], []
    for k in range(2, reports[0]["rounds"] + 1):
        rows = [next(w for w in r[key] if w["round"] == k) for r in reports]
        per_round.append({"round": k, **over_seeds([w["ess_fraction"] for w in rows])})
        accs = [w["policy_pair_accuracy"] for w in rows if w["policy_pair_accuracy"] is not None]
        accuracy.append({"round": k, "before": mean_or_none([a["before"] for a in accs]),
                         "after": mean_or_none([a["after"] for a in accs]),
                         "num_seeds": len(accs)})
    return per_round, accuracy


def aggregate_report(run_dirs: list[Path]) -> dict:
    reports = [read_run_report(d) for d in run_dirs]
    check_same_setup(run_dirs, reports)
    seeds, arm_names = [r["seed"] for r in reports], list(reports[0]["arms"])

    # 1. each arm's final numbers, mean +- s.e. over seeds
    arms = {arm: {key: over_seeds([r["arms"][arm][key] for r in reports]) for key in FINAL_KEYS}
            for arm in arm_names}

    # 2. paired by seed
    comparisons = [(a, b) for a, b in COMPARISONS if a in arm_names and b in arm_names]
    paired_differences = {f"{a}_minus_{b}": {"gold": paired(reports, a, b)} for a, b in comparisons}

    # 2b. the held-out set's own noise in one seed's numbers (s.e. over prompts), averaged over
    #     seeds; every seed is evaluated on the same prompts, and the s.e. over seeds above
    #     already includes this noise
    held_out_noise = {key: sum(r["held_out_noise"][key] for r in reports) / len(reports)
                      for key in reports[0]["held_out_noise"]}
    held_out_gold_se = {arm: sum(r["arms"][arm]["gold_se"] for r in reports) / len(reports)
                        for arm in arm_names}

    # 3. curves: the i-th evaluation point of every seed (same episodes, checked above)
    curves = {}
    for arm in arm_names:
        curves[arm] = []
        for points in zip(*(r["arms"][arm]["curve"] for r in reports)):
            gold = over_seeds([p["gold"] for p in points])
            proxy = over_seeds([p["proxy"] for p in points])
            kl_to_sft = over_seeds([p["kl_to_sft"] for p in points])
            curves[arm].append({"episodes": points[0]["episodes"],
                                "gold_mean": gold["mean"], "gold_std_err": gold["std_err"],
                                "proxy_mean": proxy["mean"], "proxy_std_err": proxy["std_err"],
                                "kl_to_sft_mean": kl_to_sft["mean"]})

    # 4. per refit round of OCRM (and of the fresh-pairs control, when it ran)
    agg = {"seeds": seeds, "rounds": reports[0]["rounds"],
           "episodes_per_round": reports[0]["episodes_per_round"],
           "run_dirs": [str(d) for d in run_dirs], "arms": arms,
           "paired_differences": paired_differences, "curves": curves,
           "held_out_noise": held_out_noise, "held_out_gold_se": held_out_gold_se,
           "overoptimization": [{"seed": r["seed"], **r["overoptimization"]["standard_rlhf"]}
                                for r in reports if "standard_rlhf" in r["overoptimization"]],
           "weights": [{"seed": r["seed"], "weights": r["weights"]} for r in reports]}
    if "ocrm" in arm_names:
        agg["ess_fraction"], agg["policy_pair_accuracy"] = refit_rounds(reports, "weights")
    for arm in CONTROL_ARMS:
        if arm in arm_names:
            _, agg[f"{arm}_policy_pair_accuracy"] = refit_rounds(reports, f"{arm}_refits")
    return agg


def plus_minus(stat: dict, fmt: str) -> str:
    """`mean ± s.e.` (just the mean for one seed); a sign asked for in fmt goes on the mean only."""
    text = format(stat["mean"], fmt)
    if stat["std_err"] is None:
        return text
    return f"{text} ± {format(stat['std_err'], fmt.lstrip('+'))}"


def aggregate_markdown(agg: dict) -> str:
    n = len(agg["seeds"])
    lines = [f"# OCRM over {n} seeds ({', '.join(map(str, agg['seeds']))}), {agg['rounds']} rounds",
             "",
             *fresh_pairs_note(agg["weights"][0]["weights"]),
             "Mean ± standard error over seeds (s.e. = sample std / sqrt(n)) of each arm's "
             "final evaluation on the fixed held-out prompts (near-greedy decode, T = 0.01); KL to SFT "
             "from T = 0.7 samples. `proxy` is each arm's own last reward model.", "",
             *FINAL_HEADER]
    for arm, r in agg["arms"].items():
        lines.append(f"| {LABELS[arm]} | {plus_minus(r['gold'], '.3f')} | "
                     f"{plus_minus(r['proxy'], '.3f')} | {plus_minus(r['kl_to_sft'], '.2f')} | "
                     f"{plus_minus(r['win_rate_vs_sft'], '.3f')} | "
                     f"{plus_minus(r['win_rate_vs_reference'], '.3f')} |")
    lines += ["", "Final gold per seed:", "",
              "| seed | " + " | ".join(LABELS[a] for a in agg["arms"]) + " |",
              "|---" * (len(agg["arms"]) + 1) + "|"]
    for i, seed in enumerate(agg["seeds"]):
        lines.append(f"| {seed} | " + " | ".join(f"{r['gold']['per_seed'][i]:.3f}"
                                                 for r in agg["arms"].values()) + " |")
    if agg["paired_differences"]:
        lines += ["", "Paired by seed (final gold):", "",
                  "| arm | minus | mean difference | better on |", "|---|---|---|---|"]
        for key, d in agg["paired_differences"].items():
            arm, control = next((a, b) for a, b in COMPARISONS if f"{a}_minus_{b}" == key)
            lines.append(f"| {LABELS[arm]} | {LABELS[control]} | {plus_minus(d['gold'], '+.3f')} "
                         f"| {d['gold']['wins']} of {n} seeds |")
    lines += noise_lines(list(agg["held_out_gold_se"].values()), agg["held_out_noise"],
                         " in one seed's numbers, mean over seeds")
    if agg["overoptimization"]:
        drops = [o["gold_drop_from_peak"] for o in agg["overoptimization"]]
        lines += ["", f"Standard RLHF's gold (T = 0.7 samples) ended below its peak on "
                  f"{sum(x > 0 for x in drops)} of {n} seeds; drop from the peak "
                  f"{plus_minus(over_seeds(drops), '.3f')}."]
    if "ess_fraction" in agg:
        lines += ["", "Per OCRM round, mean over seeds: the weights' ESS / N, and how well the RM "
                  "ranks fresh pairs sampled from the policy being corrected (accuracy vs gold), "
                  "before and after the refit.", "",
                  "| OCRM round | ESS / N | policy-pair acc before | after | seeds |",
                  "|---|---|---|---|---|"]
        for ess, acc in zip(agg["ess_fraction"], agg["policy_pair_accuracy"]):
            before, after = ("-" if acc[k] is None else f"{acc[k]:.3f}" for k in ("before", "after"))
            lines.append(f"| {ess['round']} | {plus_minus(ess, '.3f')} | {before} | {after} "
                         f"| {acc['num_seeds']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The gates a variant of the embedded task must pass, in order (docs/experiments.md)
# ----------------------------------------------------------------------------------------------
def gates(run_dirs: list[Path]) -> dict:
    """Each gate's numbers per seed and whether it passes; a gate whose arms were not run is
    None. Gates 3 and 4 compare arms paired by seed (mean > k s.e. of the paired difference)."""
    reports = [read_run_report(d) for d in run_dirs]
    out = {"seeds": [r["seed"] for r in reports], "run_dirs": [str(d) for d in run_dirs]}
    have = lambda *arms: all(a in r["arms"] for r in reports for a in arms)   # noqa: E731

    # 1. headroom: the best of standard RLHF's stage finals above SFT by > 5 held-out s.e. (SFT's)
    if have("standard_rlhf"):
        rows = []
        for r in reports:
            best = max(r["arms"]["standard_rlhf"]["stage_finals"], key=lambda f: f["gold"])
            sft = r["arms"]["sft"]
            rows.append({"seed": r["seed"], "sft": sft["gold"], "best": best["gold"],
                         "best_stage": best["stage"], "se": sft["gold_se"],
                         "margin_se": (best["gold"] - sft["gold"]) / sft["gold_se"]})
        out[1] = {"per_seed": rows, "passed": all(x["margin_se"] > GATE_SE[1] for x in rows)}
        # 2. overoptimization: T = 0.7 gold falls from its peak by > 3 s.e. while the proxy rises
        rows = []
        for r in reports:
            o = r["overoptimization"]["standard_rlhf"]
            rows.append({"seed": r["seed"], "peak": o["peak_gold"], "final": o["final_gold"],
                         "drop_se": o["gold_drop_from_peak"] / o["peak_gold_se"],
                         "proxy_gain": o["proxy_gain_after_peak"]})
        out[2] = {"per_seed": rows, "passed": all(x["drop_se"] > GATE_SE[2] and x["proxy_gain"] > 0
                                                  for x in rows)}
    # 3b: gate 3 with the control that keeps the stored pairs (docs/experiments.md, v32)
    for gate, arm, controls in ((3, "fresh_pairs", ("standard_rlhf",)),
                                ("3b", "fresh_plus_stored", ("standard_rlhf",)),
                                (4, "ocrm", ("standard_rlhf", "ppo_new_kl"))):
        if not have(arm, *controls):
            continue
        diffs = {c: paired(reports, arm, c) for c in controls}
        passed = all(d["std_err"] is not None and d["mean"] > GATE_SE[gate] * d["std_err"]
                     for d in diffs.values())
        out[gate] = {"differences": diffs, "passed": passed}
        if gate == 4:                          # and OCRM ends above the SFT policy
            above = paired(reports, arm, "sft")
            out[gate]["minus_sft"] = above
            out[gate]["passed"] = passed and above["mean"] > 0
    return out


def gates_markdown(g: dict) -> str:
    n, fmt = len(g["seeds"]), lambda x: f"{x:+.2f}"          # noqa: E731
    lines = [f"# Gates over {n} seeds ({', '.join(map(str, g['seeds']))})", "",
             "| gate | per seed | verdict |", "|---|---|---|"]
    verdict = lambda ok: "pass" if ok else "FAIL"             # noqa: E731
    if 1 in g:
        per = "; ".join(f"s{x['seed']}: SFT {x['sft']:.2f} -> {x['best']:.2f} ({x['best_stage']}), "
                        f"{x['margin_se']:+.1f} s.e." for x in g[1]["per_seed"])
        lines.append(f"| 1 RLHF beats SFT by > 5 s.e. | {per} | {verdict(g[1]['passed'])} |")
        per = "; ".join(f"s{x['seed']}: peak {x['peak']:.2f} -> {x['final']:.2f} "
                        f"({x['drop_se']:.1f} s.e.), proxy {fmt(x['proxy_gain'])}"
                        for x in g[2]["per_seed"])
        lines.append(f"| 2 standard RLHF overoptimizes (> 3 s.e.) | {per} | "
                     f"{verdict(g[2]['passed'])} |")
    for gate, title in ((3, "3 fresh-pairs control beats standard RLHF (> 2 s.e.)"),
                        ("3b", "3b fresh + stored pairs control beats standard RLHF (> 2 s.e.)"),
                        (4, "4 OCRM beats standard RLHF and PPO + new KL (> 2 s.e.), and SFT")):
        if gate == "3b" and gate not in g:   # an optional control: listed only when it ran
            continue
        if gate not in g:
            lines.append(f"| {title} | not run | - |")
            continue
        diffs = dict(g[gate]["differences"], **({"sft": g[gate]["minus_sft"]} if gate == 4 else {}))
        per = "; ".join(f"minus {LABELS[c]} {plus_minus(d, '+.3f')} ({d['wins']} of {n}): "
                        + ", ".join(fmt(x) for x in d["per_seed"]) for c, d in diffs.items())
        lines.append(f"| {title} | {per} | {verdict(g[gate]['passed'])} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def write_atomically(path: Path, write) -> None:
    """write(tmp) under a hidden name, then rename: a killed run never leaves half a report."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def write_report(out: Path, report: dict, text: str, plot_to) -> None:
    write_atomically(out / "report.json", lambda tmp: C.write_json(tmp, report))
    write_atomically(out / "report.md", lambda tmp: tmp.write_text(text))
    write_atomically(out / "curves.png", lambda tmp: plot_to(report, tmp))
    print(text)


def main(argv=None):
    args = parse_args(argv)
    if args.run_dir is not None:
        run_dir = Path(args.run_dir)
        report = build_report(run_dir, args.rounds, args.seed, args.arms)
        write_report(run_dir, report, markdown(report), plot)
        return
    if args.gates is not None:
        print(gates_markdown(gates([Path(d) for d in args.gates])))
        return
    run_dirs, out = [Path(d) for d in args.aggregate], Path(args.out)
    if any(out.resolve() == d.resolve() for d in run_dirs):
        raise C.StageError(f"--out {out} is one of the run directories; its report.json would be "
                           f"overwritten")
    agg = aggregate_report(run_dirs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise C.StageError(f"cannot write the output directory {out}: {e.strerror}")
    write_report(out, agg, aggregate_markdown(agg), plot_aggregate)


if __name__ == "__main__":
    C.run_main(main)
