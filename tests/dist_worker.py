"""The torchrun side of tests/test_distributed.py: run as

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py WORK

with WORK holding the single-process reference outputs the test made first (WORK/ref). Each rank
runs the stages' own main() under the process group (gloo, CPU) on the same inputs and flags,
writing to WORK/dist (rank 0 only, as every stage does), and the PPO step and the whitening
below, whose results each rank saves to WORK/dist/ppo_rank{r}.pt. The test compares.
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common as C  # noqa: E402
import ocrm_correct as OC  # noqa: E402
import ppo  # noqa: E402
import reward_model as RM  # noqa: E402
import sft as SFT  # noqa: E402
import task as T  # noqa: E402

# The flags both sides use. SFT: one optimizer step on 64 examples; RM: one step on the 72
# training pairs of 80 (10% held out); the pairs and the log-probs in forward batches of 20 and
# 16, so the shards cut the rows unevenly.
SFT_FLAGS = ["--num_examples", "64", "--batch_size", "64", "--epochs", "1", "--seed", "3",
             "--device", "cpu"]
PAIRS_FLAGS = ["--num_pairs", "80", "--forward_batch_size", "20"]
RM_FLAGS = ["--epochs", "1", "--batch_size", "72", "--seed", "3", "--device", "cpu"]
OCRM_FLAGS = ["--epochs", "1", "--batch_size", "72", "--seed", "3", "--device", "cpu",
              "--forward_batch_size", "16"]
PPO_EPISODES = 16


def sft_argv(out):
    return ["--out", str(out), *SFT_FLAGS]


def rm_argv(ref, prefs, out):
    return ["--sft", str(ref / "sft"), "--prefs", str(prefs), "--out", str(out), *PAIRS_FLAGS,
            *RM_FLAGS]


def ocrm_argv(ref, base):
    return ["--policy", str(ref / "policy"), "--sft", str(ref / "sft"), "--prefs",
            str(ref / "prefs"), "--weights_out", str(base / "weights"), "--out",
            str(base / "rm_2"), *OCRM_FLAGS]


def critic_warmup_step(ref: Path) -> bool:
    """One critic warm-up optimise() (train_policy=False) on the fixed batch: does the policy
    stay exactly where it was? (AdamW must skip it, as with one process: no gradient on any rank.)"""
    batch, models, opt, tokenizer, args = fixed_ppo_setup(ref, micro=2, rows=None)
    before = [p.detach().clone() for p in models.policy.parameters()]
    ppo.optimise(1, batch, PPO_EPISODES, models, opt, tokenizer, args, train_policy=False)
    return all(torch.equal(a, p) for a, p in zip(before, models.policy.parameters()))


def fixed_ppo_setup(ref: Path, micro: int, rows: slice | None):
    """The fixed batch of 16 episodes (this process's rows of it), models, optimizer, flags."""
    policy, tokenizer = C.load_policy(ref / "policy", "cpu")
    value, _ = C.load_reward_model(ref / "rm", "cpu")
    value.requires_grad_(True)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    task = T.load_task(ref / "sft", "cpu")
    query = C.encode_prompts(tokenizer, task.ppo_prompts(PPO_EPISODES, seed=5), task.max_prompt_len)
    response, logp_old = C.sample(policy, query, pad, eos, task.response_len, 0.7,
                                  torch.Generator().manual_seed(5))
    mask = C.response_mask(response, eos).float()
    with torch.no_grad():
        values_old = ppo.token_values(value, query, response, pad, eos) * mask
    g = torch.Generator().manual_seed(6)
    raw = torch.randn(mask.shape, generator=g) * 3 + 1          # advantages before whitening
    returns = torch.randn(mask.shape, generator=g) * mask
    rows = C.shard(PPO_EPISODES) if rows is None else rows
    advantages = ppo.masked_whiten(raw[rows], mask[rows])
    batch = ppo.Rollout(query[rows], response[rows], mask[rows], logp_old[rows], values_old[rows],
                        advantages, returns[rows], rows)
    args = ppo.parse_args(["--init", "-", "--kl_ref", "-", "--sft", "-", "--reward_model", "-",
                           "--out", "-", "--batch_size", str(PPO_EPISODES), "--minibatches", "2",
                           "--ppo_epochs", "2", "--micro_batch_size", str(micro)])
    models = ppo.PPOModels(policy, value, kl_ref=policy, rm=value, sft=None)
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=1e-3, eps=1e-5)
    torch.manual_seed(7)                                        # the minibatch permutations
    return batch, models, opt, tokenizer, args


def ppo_step(ref: Path, micro: int = 2, rows: slice | None = None) -> dict:
    """Whitening and one PPO optimise() (2 epochs x 2 minibatches, micro-batches of `micro`, 0:
    none) on a fixed batch of 16 episodes, on this process's rows of it (all of them with one
    process; `rows` overrides that, to make a rank that never all-reduces)."""
    batch, models, opt, tokenizer, args = fixed_ppo_setup(ref, micro, rows)
    ppo.optimise(1, batch, PPO_EPISODES, models, opt, tokenizer, args)
    return {"rows": (batch.rows.start, batch.rows.stop), "advantages": batch.advantages,
            "policy": {k: v.detach().clone() for k, v in models.policy.state_dict().items()},
            "value": {k: v.detach().clone() for k, v in models.value.state_dict().items()}}


def main(work: Path) -> None:
    ref, out = work / "ref", work / "dist"
    C.pick_device("cpu")                                    # joins the process group (gloo)
    rank, world = C.rank_and_world()
    assert world == 2, world
    SFT.main(sft_argv(out / "sft"))
    RM.main(rm_argv(ref, ref / "prefs", out / "rm"))          # the reference's pairs: a fit only
    RM.main(rm_argv(ref, out / "prefs", out / "rm_new"))      # pairs sampled here, sharded
    OC.main(ocrm_argv(ref, out))
    torch.save({**ppo_step(ref), "warmup_keeps_policy": critic_warmup_step(ref)},
               out / f"ppo_rank{rank}.pt")
    C.barrier()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
    torch.distributed.destroy_process_group()
