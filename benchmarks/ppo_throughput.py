"""Throughput, measured side by side: our stages against TRL 1.12.0 on identical work.

Three measurements. In each one, a step of ours and a step of the baseline take turns in one
process, so that whatever else loads the machine slows both sides alike:

  ppo    seconds per PPO update and episodes/s: ppo.py's own update function,
         ppo.ppo_update (steps 1-6, logging included), against trl.experimental.ppo.PPOTrainer.
  rm     pairs/s of one reward-model step: reward_model.fit_reward_model's inner loop
         (C.pair_reward_scores: each prompt once, then both responses; RM.bt_loss, AdamW) against
         trl.RewardTrainer.
  score  tokens/s of C.sequence_logprobs (ocrm_correct.py's l_k) against a bare batched forward
         pass of the same model (no masks, no log-softmax, no KV cache: a lower bound on time).

The identical work, on both sides: fp32 on the CPU, torch.set_num_threads(2) (--threads).
  models   GPT-2, 2 layers, width 64, 4 heads, a 32-word vocabulary, dropout 0, built by
           sft.build_model. Policy and reference are causal LMs; reward and value model are
           sequence classifiers (one scalar). Each side gets its own copies of the same weights.
  ppo      64 episodes per update of 8-token prompts (no padding); 24 new tokens at T = 0.7,
           no early stop; k1 KL penalty 0.05; GAE gamma 1, lambda 0.95, advantages whitened;
           4 epochs x 2 minibatches of 32; clipped policy loss (0.2) and clipped value loss
           (0.2, coefficient 0.1); AdamW, lr 3e-4 decayed linearly; a response with no EOS is
           penalised (ours: score -1, TRL: missing_eos_penalty 1).
  rm       64 pairs per step; each response of a pair, with its 8-token prompt, is 32 real
           tokens (23 words and an EOS); AdamW lr 3e-4, weight decay 0.01, no
           gradient clipping, linear decay.
  score    2048 sequences of 8 + 24 tokens per pass, in batches of 256, T = 1.0.
Reported: the median over the steps after the first 2 (--updates 22 gives the 20 steady steps a
measurement needs), seconds per step, items per second and ours / baseline.

What still differs, and which way it leans:
  - ppo.py clips the gradient norm at 1.0 and TRL's PPOTrainer does not (costs us).
  - Both sides use the fused AdamW kernel (TRL's Trainer default adamw_torch_fused for
    torch >= 2.8; fused=True in ppo.py and reward_model.py).
  - TRL's printing callbacks are removed (output only, helps TRL); its logging, its two
    gc.collect() per PPO update and everything else stay and are timed. The time in TRL's
    gc.collect() is reported separately so the ratio can also be read without it. gc.collect()
    walks every Python object in the process: about 450k once TRL is imported, of which this
    harness (our modules, models and data) adds about 2%.
  - No early stop: TRL runs with stop_token=None, its setting for fixed-length rollouts (with
    stop_token="eos", generate() stops as soon as all 64 responses have an EOS, which happened
    here within a few updates, and TRL then does less work than ppo.py). So for TRL an EOS is an
    ordinary token, while ppo.py pads everything after the first EOS. Both sides still process
    the same tensors (64 x 24 sampled tokens, 64 x 32 forward passes); only which positions the
    masks count differs, which costs no time. The number of new tokens of every TRL rollout is
    recorded and printed, to show it stays 24.

Run (TRL lives in a venv, so the packages the stages run with stay untouched):

    python -m venv /tmp/trl-venv --system-site-packages
    /tmp/trl-venv/bin/pip install -r benchmarks/requirements.txt
    /tmp/trl-venv/bin/python benchmarks/ppo_throughput.py --updates 22 --out benchmarks/results.json

`--skip_trl` measures our side alone (no TRL needed, any Python with ../requirements.txt).
"""
import argparse
import contextlib
import copy
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")            # nothing is downloaded
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")   # TRL's trainers ping the Hub otherwise
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import GPT2ForSequenceClassification  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import task as T  # noqa: E402
import ppo  # noqa: E402
import reward_model as RM  # noqa: E402
import sft  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The identical work
# ----------------------------------------------------------------------------------------------
THREADS = 2                 # torch threads (--threads)
VOCAB = 32                  # <pad>, <eos>, <unk> and 29 words
N_LAYER, N_EMBD, N_HEAD = 2, 64, 4
PROMPT_LEN, RESPONSE_LEN = 8, 24
EPISODES = 64               # per PPO update; also pairs per RM step
MINIBATCHES, PPO_EPOCHS = 2, 4
TEMPERATURE, BETA = 0.7, 0.05
GAMMA, GAE_LAMBDA = 1.0, 0.95
CLIP, VF_CLIP, VF_COEF = 0.2, 0.2, 0.1
LR = 3e-4
RM_PAIRS = 512              # pool the RM steps draw their batches from
SCORE_SEQUENCES, SCORE_BATCH = 2048, 256
DROPPED = 2                 # warm-up steps left out of the medians
STEADY_NEEDED = 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--updates", type=int, default=DROPPED + STEADY_NEEDED,
                   help="timed steps per side in each benchmark (PPO updates, RM steps, scoring "
                        f"passes); the first {DROPPED} are dropped from the medians")
    p.add_argument("--skip_trl", action="store_true",
                   help="measure our side only (PPO and RM); no TRL import")
    p.add_argument("--which", nargs="+", choices=("ppo", "rm", "score"),
                   default=["ppo", "rm", "score"], help="benchmarks to run")
    p.add_argument("--seed", type=int, default=1, help="random seed (weights, prompts, sampling)")
    p.add_argument("--threads", type=int, default=THREADS,
                   help="torch.set_num_threads for both sides (the stated work uses 2; 1 is far "
                        "less disturbed by other jobs on a busy machine)")
    p.add_argument("--out", default=None, help="write the results and versions to this JSON file")
    args = p.parse_args(argv)
    if args.updates <= DROPPED:
        p.error(f"--updates must exceed the {DROPPED} dropped warm-up steps")
    if args.threads <= 0:
        p.error("--threads must be positive")
    return args


# ----------------------------------------------------------------------------------------------
# Tokenizer, models, data (plumbing)
# ----------------------------------------------------------------------------------------------
def build_tokenizer():
    """A 32-word word-level tokenizer: <pad> = 0, <eos> = 1, <unk> = 2, then w3 ... w31."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(3, VOCAB)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def build_models(tokenizer, seed):
    """Policy and reference (sft.py's GPT-2), reward and value model (same backbone, one scalar).

    The policy is built by sft.py's own build_model, so a change to the pipeline's model (say its
    activation function) reaches both sides of the benchmark alike; the sizes are checked here.
    """
    torch.manual_seed(seed)
    sizes = argparse.Namespace(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD)   # sft.py's flags
    policy = sft.build_model(tokenizer, sizes)
    c = policy.config
    if ((c.vocab_size, c.n_layer, c.n_embd, c.n_head) != (VOCAB, N_LAYER, N_EMBD, N_HEAD)
            or max(c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) != 0
            or c.n_positions < PROMPT_LEN + RESPONSE_LEN):
        raise SystemExit(f"error: sft.build_model no longer gives the benchmark's model: {c}")
    rm_config = copy.deepcopy(c)
    rm_config.num_labels = 1                  # reward_model.py: from_pretrained(sft, num_labels=1)
    rm = GPT2ForSequenceClassification(rm_config)
    return policy, copy.deepcopy(policy), rm, copy.deepcopy(rm)   # policy, ref, rm, value


def clone(models):
    return tuple(copy.deepcopy(m) for m in models)


def random_words(n, length, generator):
    """(n, length) ids of ordinary words (never pad, EOS or unk)."""
    return torch.randint(3, VOCAB, (n, length), generator=generator)


# ----------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------
def summary(seconds, items_per_step, unit):
    """Median seconds per step over the steady steps, and items (episodes, pairs, tokens) per second."""
    steady = seconds[DROPPED:]
    median = statistics.median(steady)
    return {"seconds_per_step": median, f"{unit}_per_second": items_per_step / median,
            "steady_steps": len(steady), "seconds_all_steps": seconds}


class TimedGC:
    """Stands in for the `gc` module inside TRL's PPO trainer: same calls, time in collect() summed."""

    def __init__(self):
        self.seconds = 0.0

    def collect(self, *args):
        start = time.perf_counter()
        found = gc.collect(*args)
        self.seconds += time.perf_counter() - start
        return found

    def __getattr__(self, name):
        return getattr(gc, name)


def alternating_callback(our_step, timed_gc=None):
    """A TrainerCallback that times each trainer step and runs one step of ours after it.

    A trainer step is timed from the moment our previous step returned to the trainer's
    on_step_end, so everything the trainer does between two steps (data loading, logging, the
    trailing gc.collect of the PPO loop) is counted once; our step runs inside the callback and
    is not counted on the trainer's side.
    """
    from transformers import TrainerCallback

    class Alternate(TrainerCallback):
        def __init__(self):
            self.trl_seconds, self.our_seconds, self.gc_seconds, self.logs = [], [], [], []
            self.resumed = self.gc_at_resume = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.resumed = time.perf_counter()
            self.gc_at_resume = timed_gc.seconds if timed_gc is not None else 0.0

        def on_step_end(self, args, state, control, **kwargs):
            self.trl_seconds.append(time.perf_counter() - self.resumed)
            if timed_gc is not None:
                self.gc_seconds.append(timed_gc.seconds - self.gc_at_resume)
            self.our_seconds.append(our_step(len(self.our_seconds) + 1))
            self.resumed = time.perf_counter()
            self.gc_at_resume = timed_gc.seconds if timed_gc is not None else 0.0

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    return Alternate()


def optimizer_steps(opt) -> int:
    """How many steps an Adam-type optimizer has taken (its first parameter's step count)."""
    return int(next(iter(opt.state.values()))["step"])


def quiet(trainer):
    """Remove the trainer's progress bar and log printer (output only; the logging itself stays)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)


# ----------------------------------------------------------------------------------------------
# 1. PPO: ppo.py's update against TRL's PPOTrainer
# ----------------------------------------------------------------------------------------------
def our_ppo(models, tokenizer, prompts, updates, seed):
    """ppo.py's own update, ppo.ppo_update (steps 1-6), set up as ppo.py's main() sets it up.

    Returns step(update) -> seconds, the list the per-update log rows go to, and the optimizer.
    The differences from ppo.py's main loop: prompts are given, not drawn from the task;
    R = RESPONSE_LEN instead of T.RESPONSE_LEN (set on the task); no held-out evaluation every --eval_every
    updates (ppo.py's own episodes/s leaves it out too); no progress bar.
    """
    args = ppo.parse_args([   # ppo.py's own flags, so a renamed or retyped flag fails loudly here
        "--init", "-", "--kl_ref", "-", "--sft", "-", "--reward_model", "-", "--out", "-",
        "--seed", str(seed), "--device", "cpu", "--updates", str(updates),
        "--batch_size", str(EPISODES), "--minibatches", str(MINIBATCHES),
        "--ppo_epochs", str(PPO_EPOCHS), "--lr", str(LR), "--beta", str(BETA),
        "--temperature", str(TEMPERATURE), "--gamma", str(GAMMA), "--gae_lambda", str(GAE_LAMBDA),
        "--clip", str(CLIP), "--vf_clip", str(VF_CLIP), "--vf_coef", str(VF_COEF)])
    device = torch.device("cpu")
    policy, kl_ref, rm, value_model = models
    for m in (kl_ref, rm):
        m.requires_grad_(False)
    params = list(policy.parameters()) + list(value_model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, eps=1e-5, fused=True)   # as ppo.py
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0 - u / args.updates)
    B = args.batch_size
    gen = torch.Generator(device=device).manual_seed(args.seed)
    task = T.ToyTask()               # the embedded task's gold reward, with the benchmark's length
    task.response_len = RESPONSE_LEN
    metrics = []

    def step(update):
        t0 = time.perf_counter()
        # the KL reference is the SFT policy here (as in round 1), so sft=None
        models = ppo.PPOModels(policy, value_model, kl_ref, rm, sft=None)
        metrics.append(ppo.ppo_update(update, prompts[(update - 1) * B:update * B], models,
                                      tokenizer, opt, sched, gen, args, task))
        return time.perf_counter() - t0

    return step, metrics, opt


def trl_ppo(models, tokenizer, prompt_ids, updates, seed, our_step, workdir):
    """TRL's PPOTrainer on the same work; our_step(update) runs after each of its updates."""
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    import trl.experimental.ppo.ppo_trainer as trl_ppo_module

    policy, ref_policy, reward_model, value_model = models
    timed_gc = TimedGC()
    trl_ppo_module.gc = timed_gc                  # timing only: gc.collect() still runs
    new_tokens = []
    real_generate = policy.generate

    def counted_generate(*args, **kwargs):        # records how many tokens each rollout generated
        out = real_generate(*args, **kwargs)
        new_tokens.append(out.sequences.shape[1] - kwargs["input_ids"].shape[1])
        return out

    policy.generate = counted_generate
    config = PPOConfig(
        output_dir=str(workdir), report_to="none", save_strategy="no", use_cpu=True, bf16=False,
        seed=seed, disable_tqdm=True, num_sample_generations=0,
        per_device_train_batch_size=EPISODES, gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=EPISODES, num_mini_batches=MINIBATCHES,
        num_ppo_epochs=PPO_EPOCHS, total_episodes=EPISODES * updates,
        response_length=RESPONSE_LEN, temperature=TEMPERATURE, stop_token=None,   # no early stop
        missing_eos_penalty=1.0, kl_coef=BETA, kl_estimator="k1", whiten_rewards=False,
        gamma=GAMMA, lam=GAE_LAMBDA, cliprange=CLIP, cliprange_value=VF_CLIP, vf_coef=VF_COEF,
        learning_rate=LR, adam_epsilon=1e-5, weight_decay=0.01, lr_scheduler_type="linear")
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy,
                         ref_model=ref_policy, reward_model=reward_model, value_model=value_model,
                         train_dataset=Dataset.from_dict({"input_ids": prompt_ids}))
    quiet(trainer)
    alternate = alternating_callback(our_step, timed_gc)
    trainer.add_callback(alternate)
    try:
        trainer.train()
    finally:
        trl_ppo_module.gc = gc
    return alternate, new_tokens, trainer.optimizer.optimizer, config.optim


def bench_ppo(tokenizer, models, updates, seed, skip_trl):
    gen = torch.Generator().manual_seed(seed + 1)
    prompt_ids = random_words(EPISODES * updates, PROMPT_LEN, gen)                  # (N, P)
    prompts = [tokenizer.decode(row) for row in prompt_ids.tolist()]               # ppo.py encodes text
    assert C.encode_prompts(tokenizer, prompts[:4]).equal(prompt_ids[:4])         # round trip
    our_step, our_metrics, our_opt = our_ppo(clone(models), tokenizer, prompts, updates, seed)
    result = {"work": {"episodes_per_update": EPISODES, "prompt_tokens": PROMPT_LEN,
                       "new_tokens": RESPONSE_LEN, "epochs": PPO_EPOCHS, "minibatches": MINIBATCHES,
                       "activation": models[0].config.activation_function}}
    if skip_trl:
        seconds = [our_step(u) for u in range(1, updates + 1)]
    else:
        with tempfile.TemporaryDirectory() as workdir:
            alternate, new_tokens, trl_opt, optim_name = trl_ppo(
                clone(models), tokenizer, prompt_ids.tolist(), updates, seed, our_step, workdir)
        seconds = alternate.our_seconds
        without_gc = [t - g for t, g in zip(alternate.trl_seconds, alternate.gc_seconds)]
        result["trl"] = summary(alternate.trl_seconds, EPISODES, "episodes")
        result["trl"].update(
            gc_collect_seconds_per_step=statistics.median(alternate.gc_seconds[DROPPED:]),
            seconds_per_step_without_gc=statistics.median(without_gc[DROPPED:]),
            new_tokens_per_rollout=sorted(set(new_tokens)), optimizer=optim_name,
            optimizer_steps_per_update=optimizer_steps(trl_opt) / updates,
            mean_kl=statistics.mean(log["objective/kl"] for log in alternate.logs
                                    if "objective/kl" in log))
    result["ours"] = summary(seconds, EPISODES, "episodes")
    result["ours"].update(
        optimizer="torch.optim.AdamW (default implementation)",
        optimizer_steps_per_update=optimizer_steps(our_opt) / updates,
        mean_kl=statistics.mean(row["kl_to_ref"] for row in our_metrics),
        mean_response_length=statistics.mean(row["response_length"] for row in our_metrics))
    if not skip_trl:
        ours = result["ours"]["seconds_per_step"]
        result["ours_over_trl"] = result["trl"]["seconds_per_step"] / ours
        result["ours_over_trl_without_trl_gc"] = result["trl"]["seconds_per_step_without_gc"] / ours
    return result


# ----------------------------------------------------------------------------------------------
# 2. Reward model: reward_model.py's inner loop against TRL's RewardTrainer
# ----------------------------------------------------------------------------------------------
def make_pairs(tokenizer, seed):
    """RM_PAIRS pairs: an 8-token prompt, and two 24-token responses that end in EOS."""
    gen = torch.Generator().manual_seed(seed + 2)
    query = random_words(RM_PAIRS, PROMPT_LEN, gen)                                  # (N, P)
    eos = torch.full((RM_PAIRS, 1), tokenizer.eos_token_id)
    chosen = torch.cat([random_words(RM_PAIRS, RESPONSE_LEN - 1, gen), eos], dim=1)  # (N, R)
    rejected = torch.cat([random_words(RM_PAIRS, RESPONSE_LEN - 1, gen), eos], dim=1)
    return query, chosen, rejected


def our_rm(rm, tokenizer, pairs, steps):
    """reward_model.fit_reward_model's inner loop (one step per call): pairs/s of the BT fit."""
    device = torch.device("cpu")
    query, chosen, rejected = pairs
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    weight = torch.ones(len(query))                        # fit_reward_model's unweighted case
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=LR, fused=True)  # as reward_model.py
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    steps_per_epoch = len(query) // EPISODES
    rm.train()
    order = []

    def step(k):
        nonlocal order
        t0 = time.perf_counter()
        if (k - 1) % steps_per_epoch == 0:
            order = torch.randperm(len(query))
        s = (k - 1) % steps_per_epoch
        idx = order[s * EPISODES:(s + 1) * EPISODES].to(device)
        with C.autocast(device):   # each pair's prompt computed once, for both responses
            score_c, score_r = C.pair_reward_scores(rm, query[idx], chosen[idx], rejected[idx],
                                                    pad, eos)
        loss = RM.bt_loss(score_c, score_r, weight[idx])
        C.check_finite(loss, "loss", "reward_model", k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss.item()                # fit_reward_model shows the loss on its progress bar
        return time.perf_counter() - t0

    return step


def bench_rm(tokenizer, models, steps, seed, skip_trl):
    pairs = make_pairs(tokenizer, seed)
    our_step = our_rm(copy.deepcopy(models[2]), tokenizer, pairs, steps)
    result = {"work": {"pairs_per_step": EPISODES, "tokens_per_sequence": PROMPT_LEN + RESPONSE_LEN}}
    if skip_trl:
        seconds = [our_step(k) for k in range(1, steps + 1)]
    else:
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        query, chosen, rejected = pairs
        data = Dataset.from_dict({"chosen_ids": torch.cat([query, chosen], 1).tolist(),
                                  "rejected_ids": torch.cat([query, rejected], 1).tolist()})
        with tempfile.TemporaryDirectory() as workdir:
            config = RewardConfig(
                output_dir=workdir, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                seed=seed, disable_tqdm=True, per_device_train_batch_size=EPISODES, max_steps=steps,
                learning_rate=LR, weight_decay=0.01, lr_scheduler_type="linear", max_grad_norm=0.0)
            trainer = RewardTrainer(model=copy.deepcopy(models[2]), args=config, train_dataset=data,
                                    processing_class=tokenizer)
            quiet(trainer)
            alternate = alternating_callback(our_step)
            trainer.add_callback(alternate)
            trainer.train()
        seconds = alternate.our_seconds
        result["trl"] = summary(alternate.trl_seconds, EPISODES, "pairs")
        result["trl"]["optimizer"] = config.optim
    result["ours"] = summary(seconds, EPISODES, "pairs")
    result["ours"]["optimizer"] = "torch.optim.AdamW(fused=True)"
    if not skip_trl:
        result["ours_over_trl"] = result["trl"]["seconds_per_step"] / result["ours"]["seconds_per_step"]
    return result


# ----------------------------------------------------------------------------------------------
# 3. Density-ratio scoring: C.sequence_logprobs against a bare batched forward pass
# ----------------------------------------------------------------------------------------------
def bench_score(tokenizer, models, repeats, seed):
    policy = copy.deepcopy(models[0]).eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed + 3)
    query = random_words(SCORE_SEQUENCES, PROMPT_LEN, gen)                            # (N, P)
    response = C.sample(policy, query, pad, eos, RESPONSE_LEN, 1.0, gen)[0]           # (N, R)
    input_ids = torch.cat([query, response], dim=1)                                 # (N, P+R)
    tokens = input_ids.numel()

    def ours():
        t0 = time.perf_counter()
        C.sequence_logprobs(policy, query, response, pad, eos, temperature=1.0, batch_size=SCORE_BATCH)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def bare():
        t0 = time.perf_counter()
        for i in range(0, len(input_ids), SCORE_BATCH):
            policy(input_ids=input_ids[i:i + SCORE_BATCH], use_cache=False)
        return time.perf_counter() - t0

    our_seconds, bare_seconds = [], []
    for _ in range(repeats):
        our_seconds.append(ours())
        bare_seconds.append(bare())
    result = {"work": {"sequences": SCORE_SEQUENCES, "tokens_per_pass": tokens, "batch": SCORE_BATCH},
              "ours": summary(our_seconds, tokens, "tokens"),
              "bare_forward": summary(bare_seconds, tokens, "tokens")}
    result["ours_over_bare"] = (result["bare_forward"]["seconds_per_step"]
                                / result["ours"]["seconds_per_step"])
    return result


# ----------------------------------------------------------------------------------------------
# Versions and the report
# ----------------------------------------------------------------------------------------------
def versions(skip_trl):
    import datasets
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "datasets": datasets.__version__,
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "platform": platform.platform()}
    if not skip_trl:
        import accelerate
        import trl
        out.update(trl=trl.__version__, accelerate=accelerate.__version__)
    with contextlib.suppress(Exception):
        out["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
        out["git_dirty"] = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                                "--untracked-files=no"],
                                               capture_output=True, text=True).stdout.strip())
    return out


def report(results):
    lines = []
    if "ppo" in results:
        r = results["ppo"]
        lines.append(f"ppo    ours {r['ours']['seconds_per_step']:.3f} s/update, "
                     f"{r['ours']['episodes_per_second']:.0f} episodes/s")
        if "trl" in r:
            t = r["trl"]
            lines.append(f"       TRL  {t['seconds_per_step']:.3f} s/update, "
                         f"{t['episodes_per_second']:.0f} episodes/s "
                         f"(gc.collect {t['gc_collect_seconds_per_step']:.3f} s of it; new tokens per "
                         f"rollout {t['new_tokens_per_rollout']})")
            lines.append(f"       ours / TRL {r['ours_over_trl']:.2f}x "
                         f"({r['ours_over_trl_without_trl_gc']:.2f}x against TRL without gc.collect)")
            lines.append(f"       same work? optimizer steps per update: ours "
                         f"{r['ours']['optimizer_steps_per_update']:g}, "
                         f"TRL {t['optimizer_steps_per_update']:g}; mean KL to ref: "
                         f"ours {r['ours']['mean_kl']:.3f}, TRL {t['mean_kl']:.3f}")
    if "rm" in results:
        r = results["rm"]
        lines.append(f"rm     ours {r['ours']['seconds_per_step'] * 1e3:.1f} ms/step, "
                     f"{r['ours']['pairs_per_second']:.0f} pairs/s")
        if "trl" in r:
            lines.append(f"       TRL  {r['trl']['seconds_per_step'] * 1e3:.1f} ms/step, "
                         f"{r['trl']['pairs_per_second']:.0f} pairs/s;  "
                         f"ours / TRL {r['ours_over_trl']:.2f}x")
    if "score" in results:
        r = results["score"]
        lines.append(f"score  C.sequence_logprobs {r['ours']['tokens_per_second']:,.0f} tokens/s, "
                     f"bare forward {r['bare_forward']['tokens_per_second']:,.0f} tokens/s;  "
                     f"ours / bare {r['ours_over_bare']:.2f}x")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    tokenizer = build_tokenizer()
    models = build_models(tokenizer, args.seed)
    load_before = os.getloadavg()
    results = {}
    if "ppo" in args.which:
        results["ppo"] = bench_ppo(tokenizer, models, args.updates, args.seed, args.skip_trl)
    if "rm" in args.which:
        results["rm"] = bench_rm(tokenizer, models, args.updates, args.seed, args.skip_trl)
    if "score" in args.which:
        results["score"] = bench_score(tokenizer, models, args.updates, args.seed)
    steady = args.updates - DROPPED
    print(report(results))
    if steady < STEADY_NEEDED:
        print(f"note: medians over {steady} steady steps (a measurement needs {STEADY_NEEDED}: "
              f"--updates {DROPPED + STEADY_NEEDED})")
    info = {"args": vars(args), "versions": versions(args.skip_trl),
            "load_average_before": load_before, "load_average_after": os.getloadavg(), **results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        C.write_json(Path(args.out), info)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
