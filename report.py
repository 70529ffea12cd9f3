"""Collect one run directory into report.json, report.md and curves.png.

Reads what the stages wrote (eval.jsonl / final.json of every PPO stage, settings.json of every
weights dataset, the *_info.json timings) and stitches each arm's rounds into one curve whose
`episodes` count from the start of round 1. Nothing is recomputed.

    python report.py --run_dir runs/toy-seed1 --rounds 3 --seed 1
"""
import argparse
import json
import os
from pathlib import Path

import common as C

ARMS = ("standard_rlhf", "ppo_new_kl", "ocrm")
LABELS = {"sft": "SFT", "standard_rlhf": "standard RLHF", "ppo_new_kl": "PPO + new KL",
          "ocrm": "OCRM"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", required=True, help="run directory written by run_all.sh")
    p.add_argument("--rounds", type=int, required=True, help="number of rounds (ROUNDS)")
    p.add_argument("--seed", type=int, required=True, help="the run's seed, recorded in the report")
    return p.parse_args(argv)


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
    return {"gold": final["gold"], "proxy": final["proxy"], "kl_to_sft": final["kl_to_sft"],
            "win_rate_vs_sft": final["win_rate_vs_sft"], "curve": curve}


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
    arms = {"sft": {"gold": first["sft"]["gold"], "proxy": first["sft"]["proxy"], "kl_to_sft": 0.0,
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
                        "clip": settings["clip"], "rm_heldout_accuracy": rm_info["heldout_accuracy"],
                        # pairwise accuracy vs gold on fresh samples of the policy being corrected
                        "policy_pair_accuracy": rm_info.get("policy_pair_accuracy")})
    rm_1 = json.loads((run_dir / "rm_1" / "rm_info.json").read_text())
    return {"seed": seed, "rounds": rounds, "arms": arms, "weights": weights,
            "rm_1_heldout_accuracy": rm_1["heldout_accuracy"],
            "overoptimization": {"standard_rlhf": overoptimization(arms["standard_rlhf"]["curve"])},
            "seconds": stage_seconds(run_dir)}


def markdown(report: dict) -> str:
    lines = [f"# OCRM run, seed {report['seed']}, {report['rounds']} rounds", "",
             "Final evaluation on the fixed held-out prompts (near-greedy decode, T = 0.01); "
             "KL to SFT from T = 0.7 samples. `proxy` is each arm's own last reward model.", "",
             "| arm | gold | proxy | KL to SFT | gold win rate vs SFT |", "|---|---|---|---|---|"]
    for arm, r in report["arms"].items():
        lines.append(f"| {LABELS[arm]} | {r['gold']:.3f} | {r['proxy']:.3f} | {r['kl_to_sft']:.2f} "
                     f"| {r['win_rate_vs_sft']:.3f} |")
    o = report["overoptimization"]["standard_rlhf"]
    lines += ["", f"Standard RLHF gold peaked at {o['peak_gold']:.3f} after {o['peak_episodes']} "
              f"episodes and ended at {o['final_gold']:.3f} (T = 0.7 samples); its proxy went "
              f"{o['proxy_at_peak']:.3f} -> {o['final_proxy']:.3f} over the same span.", "",
              f"RM_1 held-out pair accuracy: {report['rm_1_heldout_accuracy']:.3f}", "",
              "Per OCRM round: the weights, and how well the RM ranks fresh pairs sampled from the "
              "policy being corrected (accuracy vs gold, ties left out), before and after the refit.",
              "",
              "| OCRM round | ESS / N | min w | mean w | max w | held-out acc (SFT pairs) "
              "| policy-pair acc before | after |",
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
    for ax, (x, y) in zip(axes, (("episodes", "gold reward"), ("episodes", "proxy reward (own RM)"),
                                 ("KL to SFT", "gold reward"))):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"seed {report['seed']}: held-out prompts, T = 0.7 samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_atomically(path: Path, write) -> None:
    """write(tmp) under a hidden name, then rename: a killed run never leaves half a report."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    report = build_report(run_dir, args.rounds, args.seed)
    write_atomically(run_dir / "report.json", lambda tmp: C.write_json(tmp, report))
    write_atomically(run_dir / "report.md", lambda tmp: tmp.write_text(markdown(report)))
    write_atomically(run_dir / "curves.png", lambda tmp: plot(report, tmp))
    print(markdown(report))


if __name__ == "__main__":
    C.run_main(main)
