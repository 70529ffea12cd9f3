"""Collect one run directory into report.json, report.md and curves.png; or average several
seeds' reports into one.

One run (--run_dir): reads what the stages wrote (eval.jsonl / final.json of every PPO stage,
settings.json of every weights dataset, the *_info.json timings) and stitches each arm's rounds
into one curve whose `episodes` count from the start of round 1. Nothing is recomputed.

Several seeds (--aggregate): reads each run's report.json and writes, into --out, every arm's
final numbers as mean +- standard error over seeds (s.e. = sample std / sqrt(n)), OCRM minus each
control paired by seed (the seeds share nothing else, so the paired difference is the comparison
to trust), the curves averaged point by point, and the per-round OCRM diagnostics.

    python report.py --run_dir runs/toy-seed1 --rounds 3 --seed 1
    python report.py --aggregate runs/toy-seed1 runs/toy-seed2 runs/toy-seed3 \
        --out runs/toy-aggregate
"""
import argparse
import json
import os
from pathlib import Path

import common as C

ARMS = ("standard_rlhf", "ppo_new_kl", "ocrm")
CONTROLS = ("standard_rlhf", "ppo_new_kl")        # what OCRM is compared with
LABELS = {"sft": "SFT", "standard_rlhf": "standard RLHF", "ppo_new_kl": "PPO + new KL",
          "ocrm": "OCRM"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--run_dir", help="run directory written by run_all.sh (one seed)")
    mode.add_argument("--aggregate", nargs="+", metavar="RUN_DIR",
                      help="run directories of several seeds, each with its report.json")
    p.add_argument("--rounds", type=int, help="number of rounds (ROUNDS); with --run_dir")
    p.add_argument("--seed", type=int,
                   help="the run's seed, recorded in the report; with --run_dir")
    p.add_argument("--out", help="with --aggregate: directory for the aggregate report")
    args = p.parse_args(argv)
    if args.run_dir is not None:
        missing = [f"--{name}" for name in ("rounds", "seed") if getattr(args, name) is None]
        if missing:
            p.error(f"the following arguments are required: {', '.join(missing)}")
        if args.out is not None:
            p.error("--out goes with --aggregate; --run_dir writes into the run directory")
    else:
        if args.out is None:
            p.error("--aggregate needs --out")
        if args.rounds is not None or args.seed is not None:
            p.error("--rounds and --seed go with --run_dir; --aggregate reads them from each "
                    "report.json")
    return args


def stage_dirs(run_dir: Path, arm: str, rounds: int) -> list[Path]:
    return [run_dir / "ppo_1"] + [run_dir / arm / f"round_{k}" for k in range(2, rounds + 1)]


def arm_report(dirs: list[Path]) -> dict:
    """Final numbers of the last round and the curve over all rounds (episodes cumulative)."""
    curve, offset = [], 0
    for i, d in enumerate(dirs):
        if not (d / "final.json").is_file():
            raise C.StageError(f"{d} is missing or unfinished; run run_all.sh first")
        points = C.read_jsonl(d / "eval.jsonl")
        for p in points[1 if i else 0:]:      # a round's first point is the previous round's last
            curve.append({"episodes": offset + p["episodes"], "kl_to_sft": p["kl_to_sft"],
                          "proxy": p["proxy"], "gold": p["gold"]})
        offset += points[-1]["episodes"]
    final = json.loads((dirs[-1] / "final.json").read_text())
    return {"gold": final["gold"], "gold_se": final.get("gold_se"), "proxy": final["proxy"],
            "kl_to_sft": final["kl_to_sft"], "win_rate_vs_sft": final["win_rate_vs_sft"],
            "curve": curve}


def held_out_noise(dirs: dict[str, Path]) -> dict | None:
    """The held-out set's own noise on the comparisons: s.e. over prompts of the per-prompt
    difference OCRM minus each control (final gold, same prompts, same order). None for stages
    written before final.json kept `gold_per_prompt`."""
    per_prompt = {arm: json.loads((d / "final.json").read_text()).get("gold_per_prompt")
                  for arm, d in dirs.items()}
    if None in per_prompt.values():
        return None
    if len({len(gold) for gold in per_prompt.values()}) > 1:
        raise C.StageError(f"the arms' last rounds ({', '.join(map(str, dirs.values()))}) were "
                           f"evaluated on different numbers of held-out prompts; run every arm "
                           f"with the same --eval_prompts")
    return {f"ocrm_minus_{control}": C.std_err_or_none(
                [a - b for a, b in zip(per_prompt["ocrm"], per_prompt[control])])
            for control in CONTROLS}


def overoptimization(curve: list[dict]) -> dict:
    """Where the gold curve peaks, and how gold and proxy end relative to that peak."""
    peak = max(curve, key=lambda p: p["gold"])
    return {"peak_gold": peak["gold"], "peak_episodes": peak["episodes"],
            "proxy_at_peak": peak["proxy"], "final_gold": curve[-1]["gold"],
            "final_proxy": curve[-1]["proxy"],
            "gold_drop_from_peak": peak["gold"] - curve[-1]["gold"],
            "proxy_gain_after_peak": curve[-1]["proxy"] - peak["proxy"]}


def stage_seconds(run_dir: Path) -> dict:
    seconds = {}
    for info in sorted(p for name in ("sft_info.json", "rm_info.json", "ppo_info.json")
                       for p in run_dir.rglob(name)):
        if info.parent.name.startswith("."):
            continue
        seconds[str(info.parent.relative_to(run_dir))] = round(json.loads(info.read_text())["seconds"], 1)
    seconds["total"] = round(sum(seconds.values()), 1)
    return seconds


def build_report(run_dir: Path, rounds: int, seed: int) -> dict:
    first = json.loads((run_dir / "ppo_1" / "final.json").read_text()) \
        if (run_dir / "ppo_1" / "final.json").is_file() else None
    if first is None:
        raise C.StageError(f"{run_dir}/ppo_1 is missing or unfinished; run run_all.sh first")
    start = C.read_jsonl(run_dir / "ppo_1" / "eval.jsonl")[0]
    arms = {"sft": {"gold": first["sft"]["gold"], "gold_se": first["sft"].get("gold_se"),
                    "proxy": first["sft"]["proxy"], "kl_to_sft": 0.0,
                    "win_rate_vs_sft": 0.5,
                    "curve": [{k: start[k] for k in ("episodes", "kl_to_sft", "proxy", "gold")}]}}
    for arm in ARMS:
        arms[arm] = arm_report(stage_dirs(run_dir, arm, rounds))
    weights = []
    for k in range(2, rounds + 1):
        settings = json.loads((run_dir / "ocrm" / f"weights_{k}" / "settings.json").read_text())
        rm_info = json.loads((run_dir / "ocrm" / f"rm_{k}" / "rm_info.json").read_text())
        d = settings["diagnostics"]
        weights.append({"round": k, "ess_fraction": d["ess_fraction"], "min": d["min"],
                        "mean": d["mean"], "max": d["max"], "alpha": settings["alpha"],
                        "lam": settings["lam"], "normalize": settings["normalize"],
                        "clip": settings["clip"],
                        # > 0: the control that refits on new pairs from the policy, not OCRM
                        "fresh_pairs": settings.get("fresh_pairs", 0),
                        "rm_heldout_accuracy": rm_info["heldout_accuracy"],
                        # pairwise accuracy vs gold on fresh samples of the policy being corrected
                        "policy_pair_accuracy": rm_info.get("policy_pair_accuracy")})
    rm_1 = json.loads((run_dir / "rm_1" / "rm_info.json").read_text())
    noise = held_out_noise({arm: stage_dirs(run_dir, arm, rounds)[-1] for arm in ARMS})
    return {"seed": seed, "rounds": rounds, "arms": arms, "weights": weights,
            "held_out_noise": noise,
            "rm_1_heldout_accuracy": rm_1["heldout_accuracy"],
            "overoptimization": {"standard_rlhf": overoptimization(arms["standard_rlhf"]["curve"])},
            "seconds": stage_seconds(run_dir)}


def fresh_pairs_note(weights: list[dict]) -> list[str]:
    """report.md says so when the `ocrm` arm is ocrm_correct.py's --fresh_pairs control."""
    n = max([w.get("fresh_pairs", 0) for w in weights], default=0)
    return [f"**The `ocrm` arm here is the fresh-pairs control, not OCRM**: each refit used {n} "
            f"new gold-labelled pairs sampled from the current policy, unweighted.", ""] if n else []


def noise_lines(gold_se: list, noise: dict | None, of_what: str) -> list[str]:
    """One sentence on the held-out set's own noise (nothing for runs made before it was kept)."""
    if None in gold_se or noise is None or None in noise.values():
        return []
    return ["", f"Held-out set noise{of_what} (s.e. over the held-out prompts): each arm's final "
                f"gold ± {min(gold_se):.3f} to {max(gold_se):.3f}; on the same prompts, OCRM minus "
                f"standard RLHF ± {noise['ocrm_minus_standard_rlhf']:.3f}, minus PPO + new KL "
                f"± {noise['ocrm_minus_ppo_new_kl']:.3f}."]


def markdown(report: dict) -> str:
    note = fresh_pairs_note(report["weights"])
    lines = [f"# OCRM run, seed {report['seed']}, {report['rounds']} rounds", "", *note,
             "Final evaluation on the fixed held-out prompts (near-greedy decode, T = 0.01); "
             "KL to SFT from T = 0.7 samples. `proxy` is each arm's own last reward model.", "",
             "| arm | gold | proxy | KL to SFT | gold win rate vs SFT |", "|---|---|---|---|---|"]
    for arm, r in report["arms"].items():
        lines.append(f"| {LABELS[arm]} | {r['gold']:.3f} | {r['proxy']:.3f} | {r['kl_to_sft']:.2f} "
                     f"| {r['win_rate_vs_sft']:.3f} |")
    lines += noise_lines([r.get("gold_se") for r in report["arms"].values()],
                         report.get("held_out_noise"), "")
    o = report["overoptimization"]["standard_rlhf"]
    lines += ["", f"Standard RLHF gold peaked at {o['peak_gold']:.3f} after {o['peak_episodes']} "
              f"episodes and ended at {o['final_gold']:.3f} (T = 0.7 samples); its proxy went "
              f"{o['proxy_at_peak']:.3f} -> {o['final_proxy']:.3f} over the same span.", "",
              f"RM_1 held-out pair accuracy: {report['rm_1_heldout_accuracy']:.3f}", "",
              "Per OCRM round: the weights, and how well the RM ranks fresh pairs sampled from the "
              "policy being corrected (accuracy vs gold, ties left out), before and after the refit.",
              "",
              "| OCRM round | ESS / N | min w | mean w | max w | held-out acc "
              + ("(its own fresh pairs) " if note else "(SFT pairs) ")
              + "| policy-pair acc before | after |",
              "|---|---|---|---|---|---|---|---|"]
    for w in report["weights"]:
        acc = w["policy_pair_accuracy"] or {}
        before, after = (f"{acc[k]:.3f}" if k in acc else "-" for k in ("before", "after"))
        lines.append(f"| {w['round']} | {w['ess_fraction']:.3f} | {w['min']:.3g} | {w['mean']:.3g} "
                     f"| {w['max']:.3g} | {w['rm_heldout_accuracy']:.3f} | {before} | {after} |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["seconds"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm in ARMS:
        c = report["arms"][arm]["curve"]
        ep = [p["episodes"] for p in c]
        axes[0].plot(ep, [p["gold"] for p in c], label=LABELS[arm])
        axes[1].plot(ep, [p["proxy"] for p in c], label=LABELS[arm])
        axes[2].plot([p["kl_to_sft"] for p in c], [p["gold"] for p in c], ".-", label=LABELS[arm])
    finish_figure(fig, axes, "KL to SFT", f"seed {report['seed']}: held-out prompts, T = 0.7 samples",
                  path)


def finish_figure(fig, axes, kl_label: str, title: str, path: Path) -> None:
    """Axis labels, grid, legend and title of the three-panel figure; save and close it."""
    import matplotlib.pyplot as plt

    for ax, (x, y) in zip(axes, (("episodes", "gold reward"), ("episodes", "proxy reward (own RM)"),
                                 (kl_label, "gold reward"))):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Several seeds: mean +- standard error over the runs' report.json files
# ----------------------------------------------------------------------------------------------
FINAL_KEYS = ("gold", "proxy", "kl_to_sft", "win_rate_vs_sft")


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


def mean_if_all(values: list) -> float | None:
    """The mean, or None if any value is missing (None): a mean over some seeds only would mix
    runs made with and without the number."""
    return None if None in values else sum(values) / len(values)


def weight_settings(report: dict) -> list[str]:
    return [" ".join(f"{k}={w.get(k, 0)}" for k in ("alpha", "lam", "normalize", "clip", "fresh_pairs"))
            for w in report["weights"]]


def check_same_setup(run_dirs: list[Path], reports: list[dict]) -> None:
    """Averaging needs one seed per run, the same rounds, the same evaluation points and the same
    OCRM weight settings (the other stages' flags are not in report.json: keep them the same)."""
    first_dir, first = run_dirs[0], reports[0]
    seen = {}
    for d, r in zip(run_dirs, reports):
        if r["seed"] in seen:
            raise C.StageError(f"{seen[r['seed']]} and {d} are both seed {r['seed']}; "
                               f"aggregate one run per seed")
        seen[r["seed"]] = d
        if r["rounds"] != first["rounds"]:
            raise C.StageError(f"{d} has {r['rounds']} rounds but {first_dir} has "
                               f"{first['rounds']}; run every seed with the same ROUNDS")
        for arm in ("sft",) + ARMS:
            episodes = [p["episodes"] for p in r["arms"][arm]["curve"]]
            if episodes != [p["episodes"] for p in first["arms"][arm]["curve"]]:
                raise C.StageError(f"{d} evaluated {arm} at other episodes than {first_dir}; run "
                                   f"every seed with the same UPDATES and PPO_ARGS")
        if weight_settings(r) != weight_settings(first):
            raise C.StageError(f"{d} made its OCRM weights with {weight_settings(r)[0]} but "
                               f"{first_dir} with {weight_settings(first)[0]}; run every seed "
                               f"with the same OCRM_ARGS")


def aggregate_report(run_dirs: list[Path]) -> dict:
    reports = [read_run_report(d) for d in run_dirs]
    check_same_setup(run_dirs, reports)
    seeds = [r["seed"] for r in reports]

    # 1. each arm's final numbers, mean +- s.e. over seeds
    arms = {arm: {key: over_seeds([r["arms"][arm][key] for r in reports]) for key in FINAL_KEYS}
            for arm in ("sft",) + ARMS}

    # 2. paired by seed: d_s = gold_ocrm(s) - gold_control(s); mean +- s.e. of the d_s
    paired = {}
    for control in CONTROLS:
        diffs = [r["arms"]["ocrm"]["gold"] - r["arms"][control]["gold"] for r in reports]
        paired[f"ocrm_minus_{control}"] = {
            "gold": {**over_seeds(diffs), "wins": sum(d > 0 for d in diffs)}}

    # 2b. the held-out set's own noise in one seed's numbers (s.e. over prompts), averaged over
    #     seeds; every seed is evaluated on the same prompts, and the s.e. over seeds above
    #     already includes this noise
    noises = [r.get("held_out_noise") for r in reports]
    held_out_noise = None if None in noises else {
        key: mean_if_all([n[key] for n in noises]) for key in noises[0]}
    held_out_gold_se = {arm: mean_if_all([r["arms"][arm].get("gold_se") for r in reports])
                        for arm in ("sft",) + ARMS}

    # 3. curves: the i-th evaluation point of every seed (same episodes, checked above)
    curves = {}
    for arm in ("sft",) + ARMS:
        curves[arm] = []
        for points in zip(*(r["arms"][arm]["curve"] for r in reports)):
            gold = over_seeds([p["gold"] for p in points])
            proxy = over_seeds([p["proxy"] for p in points])
            kl_to_sft = over_seeds([p["kl_to_sft"] for p in points])
            curves[arm].append({"episodes": points[0]["episodes"],
                                "gold_mean": gold["mean"], "gold_std_err": gold["std_err"],
                                "proxy_mean": proxy["mean"], "proxy_std_err": proxy["std_err"],
                                "kl_to_sft_mean": kl_to_sft["mean"]})

    # 4. per OCRM round: mean ESS, and the RM's accuracy on fresh policy pairs before/after the
    #    refit (mean over the seeds that have it; runs made without --reward_model_before do not)
    per_round, accuracy = [], []
    for k in range(2, reports[0]["rounds"] + 1):
        rows = [next(w for w in r["weights"] if w["round"] == k) for r in reports]
        per_round.append({"round": k, **over_seeds([w["ess_fraction"] for w in rows])})
        accs = [w["policy_pair_accuracy"] for w in rows if w["policy_pair_accuracy"] is not None]
        accuracy.append({"round": k, "before": mean_or_none([a["before"] for a in accs]),
                         "after": mean_or_none([a["after"] for a in accs]),
                         "num_seeds": len(accs)})

    return {"seeds": seeds, "rounds": reports[0]["rounds"],
            "run_dirs": [str(d) for d in run_dirs], "arms": arms,
            "paired_differences": paired, "curves": curves,
            "held_out_noise": held_out_noise, "held_out_gold_se": held_out_gold_se,
            "overoptimization": [{"seed": r["seed"], **r["overoptimization"]["standard_rlhf"]}
                                 for r in reports],
            "weights": [{"seed": r["seed"], "weights": r["weights"]} for r in reports],
            "ess_fraction": per_round, "policy_pair_accuracy": accuracy}


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
             "| arm | gold | proxy | KL to SFT | gold win rate vs SFT |", "|---|---|---|---|---|"]
    for arm, r in agg["arms"].items():
        lines.append(f"| {LABELS[arm]} | {plus_minus(r['gold'], '.3f')} | "
                     f"{plus_minus(r['proxy'], '.3f')} | {plus_minus(r['kl_to_sft'], '.2f')} | "
                     f"{plus_minus(r['win_rate_vs_sft'], '.3f')} |")
    lines += ["", "Final gold per seed:", "",
              "| seed | " + " | ".join(LABELS[a] for a in agg["arms"]) + " |",
              "|---" * (len(agg["arms"]) + 1) + "|"]
    for i, seed in enumerate(agg["seeds"]):
        lines.append(f"| {seed} | " + " | ".join(f"{r['gold']['per_seed'][i]:.3f}"
                                                 for r in agg["arms"].values()) + " |")
    lines += ["", "OCRM minus each control, paired by seed (final gold):", "",
              "| OCRM minus | mean difference | OCRM better on |", "|---|---|---|"]
    for control in CONTROLS:
        d = agg["paired_differences"][f"ocrm_minus_{control}"]["gold"]
        lines.append(f"| {LABELS[control]} | {plus_minus(d, '+.3f')} | "
                     f"{d['wins']} of {n} seeds |")
    lines += noise_lines(list(agg["held_out_gold_se"].values()), agg["held_out_noise"],
                         " in one seed's numbers, mean over seeds")
    drops = [o["gold_drop_from_peak"] for o in agg["overoptimization"]]
    lines += ["", f"Standard RLHF's gold (T = 0.7 samples) ended below its peak on "
              f"{sum(x > 0 for x in drops)} of {n} seeds; drop from the peak "
              f"{plus_minus(over_seeds(drops), '.3f')}.", "",
              "Per OCRM round, mean over seeds: the weights' ESS / N, and how well the RM ranks "
              "fresh pairs sampled from the policy being corrected (accuracy vs gold), before and "
              "after the refit.", "",
              "| OCRM round | ESS / N | policy-pair acc before | after | seeds |",
              "|---|---|---|---|---|"]
    for ess, acc in zip(agg["ess_fraction"], agg["policy_pair_accuracy"]):
        before, after = ("-" if acc[k] is None else f"{acc[k]:.3f}" for k in ("before", "after"))
        lines.append(f"| {ess['round']} | {plus_minus(ess, '.3f')} | {before} | {after} "
                     f"| {acc['num_seeds']} |")
    return "\n".join(lines) + "\n"


def plot_aggregate(agg: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def band(ax, x, mean, std_err, label):
        line, = ax.plot(x, mean, label=label)
        if None not in std_err:
            ax.fill_between(x, [m - s for m, s in zip(mean, std_err)],
                            [m + s for m, s in zip(mean, std_err)], color=line.get_color(),
                            alpha=0.2)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm in ARMS:
        c = agg["curves"][arm]
        ep = [p["episodes"] for p in c]
        gold, gold_se = [p["gold_mean"] for p in c], [p["gold_std_err"] for p in c]
        band(axes[0], ep, gold, gold_se, LABELS[arm])
        band(axes[1], ep, [p["proxy_mean"] for p in c], [p["proxy_std_err"] for p in c],
             LABELS[arm])
        # KL need not grow monotonically, so a band along it would fold over: error bars instead
        _, _, bars = axes[2].errorbar([p["kl_to_sft_mean"] for p in c], gold,
                                      yerr=None if None in gold_se else gold_se, fmt=".-",
                                      elinewidth=0.8, label=LABELS[arm])
        for bar in bars:
            bar.set_alpha(0.4)
    finish_figure(fig, axes, "KL to SFT (mean over seeds)",
                  f"mean ± s.e. over {len(agg['seeds'])} seeds: held-out prompts, T = 0.7 samples",
                  path)


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
        report = build_report(run_dir, args.rounds, args.seed)
        write_report(run_dir, report, markdown(report), plot)
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
