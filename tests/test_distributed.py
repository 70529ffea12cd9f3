"""Every stage under torchrun (2 CPU processes, gloo) against the same stage in one process.

One module-scoped fixture makes the single-process references in this process, then runs
tests/dist_worker.py once under `torchrun --nproc_per_node 2` (about 15 s: most of it is three
interpreters importing torch), which runs the stages' main() on the same inputs and flags.

Tolerances. Sharding changes only the order in which float32 sums are added (a gradient is
two half-batch sums added by the all-reduce instead of one sum), so gradients agree to ~1e-7
relative. Adam turns a gradient g into a step of about lr * g / (|g| + eps): one step moves a
weight by at most lr, and a float-order difference moves that step by far less, except for
weights whose gradient is itself a cancellation near 0 (its sign can flip). So weights are
compared at atol = lr / 100 per step taken, which a missing all-reduce (half the batch's gradient:
a different step for every weight), a rank that trains on the wrong rows, or a loss normalised by
the rank's own batch instead of the global one exceeds by orders of magnitude (the last test
checks that it does). Scoring (log-probs, the stored pairs) runs the single-process forward
batches exactly, so those are compared for equality.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

import common as C
import dist_worker as W
import ocrm_correct as OC
import ppo
import reward_model as RM
import sft as SFT

ROOT = Path(__file__).resolve().parents[1]
LR = {"sft": 1e-3, "rm": 3e-3, "ppo": 1e-3}             # the flags' learning rates (defaults)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist")
    ref = work / "ref"
    # the single-process references (this process: no WORLD_SIZE, so no process group)
    SFT.main(W.sft_argv(ref / "sft"))
    SFT.main(["--out", str(ref / "policy"), "--num_examples", "256", "--batch_size", "32",
              "--epochs", "1", "--seed", "4", "--device", "cpu"])       # another policy, pi_k
    RM.main(W.rm_argv(ref, ref / "prefs", ref / "rm"))
    OC.main(W.ocrm_argv(ref, ref))
    single = W.ppo_step(ref)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(ROOT / "tests" / "dist_worker.py"),
                           str(work)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dist = work / "dist"
    ranks = [torch.load(dist / f"ppo_rank{r}.pt", weights_only=True) for r in range(2)]
    return {"ref": ref, "dist": dist, "single": single, "ranks": ranks, "stdout": proc.stdout}


def assert_weights_close(a: dict, b: dict, atol: float, what: str):
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= atol, f"{what}: weights differ by up to {worst:.3g} (tolerance {atol:.3g})"
    return worst


def test_sft_step_under_torchrun_is_the_single_process_step(runs):
    ref, dist = runs["ref"], runs["dist"]
    assert_weights_close(load_file(dist / "sft" / "model.safetensors"),
                         load_file(ref / "sft" / "model.safetensors"), LR["sft"] / 100, "sft")
    assert "sft: final loss" in runs["stdout"]
    assert runs["stdout"].count("sft: final loss") == 1, "only rank 0 prints"


def test_reward_model_fit_under_torchrun_is_the_single_process_fit(runs):
    ref, dist = runs["ref"], runs["dist"]
    a, b = load_file(dist / "rm" / "model.safetensors"), load_file(ref / "rm" / "model.safetensors")
    assert_weights_close(a, b, LR["rm"] / 100, "rm")
    info_a, info_b = (json.loads((d / "rm" / "rm_info.json").read_text()) for d in (dist, ref))
    assert info_a["reward_bias"] == pytest.approx(info_b["reward_bias"], abs=1e-4)
    assert info_a["heldout_accuracy"] == info_b["heldout_accuracy"]


def test_sharded_pairs_keep_the_single_process_order_and_columns(runs):
    """Rank 0 samples rows 0..39 with the single-process generator, so they are the reference's
    rows exactly; rank 1 samples rows 40..79 with a generator of its own. Every row's gold and
    log-prob columns are what the task and the SFT policy give for it, in place."""
    ref, dist = runs["ref"], runs["dist"]
    a, b = RM.load_preferences(dist / "prefs"), RM.load_preferences(ref / "prefs")
    assert len(a) == len(b) == 80 and a.column_names == b.column_names
    first = 40                                        # rank 0's share: 2 of the 4 forward batches
    for col in RM.PREF_COLUMNS:
        assert a[col][:first] == b[col][:first], col
    assert a["chosen_ids"][first:] != b["chosen_ids"][first:], "rank 1 reused rank 0's generator"
    assert a["prompt"] == b["prompt"]                 # the prompts are the same rows, in order
    task = RM.T.load_task(ref / "sft", "cpu")
    policy, tokenizer = C.load_policy(ref / "sft", "cpu")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    query = torch.tensor(a["prompt_ids"])
    for side in ("chosen", "rejected"):
        ids = torch.tensor(a[f"{side}_ids"])
        texts, ended = C.decode_responses(tokenizer, ids, eos)
        assert texts == a[side]
        assert task.gold(a["prompt"], texts, ended).tolist() == a[f"gold_{side}"]
        logp = C.sequence_logprobs(policy, query, ids, pad, eos, 1.0, batch_size=20)
        torch.testing.assert_close(logp, torch.tensor(a[f"logp_sft_{side}"]), rtol=0, atol=1e-5)
    gold_c, gold_r = torch.tensor(a["gold_chosen"]), torch.tensor(a["gold_rejected"])
    assert (gold_c >= gold_r).all()                    # --label argmax


def test_density_ratio_scoring_under_torchrun_equals_the_single_process_columns(runs):
    ref, dist = runs["ref"], runs["dist"]
    a, b = datasets.load_from_disk(str(dist / "weights")), datasets.load_from_disk(str(ref / "weights"))
    for col in ("logp_policy_chosen", "logp_policy_rejected", "weight"):
        assert a[col] == b[col], col                    # exactly, row for row
    assert len(set(a["weight"])) > 10                   # pi_k != pi_sft: the weights vary
    assert_weights_close(load_file(dist / "rm_2" / "model.safetensors"),
                         load_file(ref / "rm_2" / "model.safetensors"), LR["rm"] / 100, "rm_2")


def test_advantage_whitening_uses_the_global_batch(runs):
    """Each rank whitens its 8 rows with the statistics of all 16: concatenated, they are the
    single-process whitening (and not each half whitened on its own)."""
    single, ranks = runs["single"], runs["ranks"]
    assert [r["rows"] for r in ranks] == [(0, 8), (8, 16)]
    joined = torch.cat([r["advantages"] for r in ranks])
    torch.testing.assert_close(joined, single["advantages"], rtol=0, atol=1e-6)
    own = torch.cat([ppo.masked_whiten(r["advantages"], r["advantages"] != 0) for r in ranks])
    assert (own - single["advantages"]).abs().max() > 1e-3, "the test cannot tell the two apart"


def test_ppo_step_under_torchrun_is_the_single_process_step(runs):
    single, ranks = runs["single"], runs["ranks"]
    atol = 2 * 2 * LR["ppo"] / 100                     # epochs x minibatches steps
    for r in ranks:                                     # every rank holds the same model
        for name in ("policy", "value"):
            assert_weights_close(r[name], single[name], atol, f"ppo {name}")
    assert all(torch.equal(ranks[0]["policy"][k], ranks[1]["policy"][k]) for k in ranks[0]["policy"])
    # the tolerance tells a missing all-reduce apart: rank 0 alone, on its 8 rows
    alone = W.ppo_step(runs["ref"], rows=slice(0, 8))
    gap = max((alone["policy"][k] - single["policy"][k]).abs().max().item() for k in alone["policy"])
    assert gap > 10 * atol, gap


def test_critic_warmup_under_torchrun_leaves_the_policy_untouched(runs):
    """No rank has a policy gradient in a warm-up update; summing would turn None into zeros,
    and AdamW would then decay and step the policy (it skips a parameter whose gradient is None)."""
    assert all(r["warmup_keeps_policy"] for r in runs["ranks"])
    assert W.critic_warmup_step(runs["ref"])                  # and with one process


def test_micro_batches_do_not_change_the_ppo_gradient(runs):
    """A minibatch's loss is the token mean over all of it, added micro-batch by micro-batch, so
    micro-batches of 2 (the reference above) and one piece per minibatch take the same steps."""
    whole = W.ppo_step(runs["ref"], micro=0)
    for name in ("policy", "value"):
        assert_weights_close(whole[name], runs["single"][name], 2 * 2 * LR["ppo"] / 100, name)
