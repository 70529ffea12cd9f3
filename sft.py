"""Stage 1: supervised fine-tuning (PAPER.md section 3, step 1).

pi_sft <- maximise log pi(reference response | prompt) on prompt -> reference pairs.

Embedded default: the "list the prompt's items" task from common.py, a word-level tokenizer
built locally and a tiny GPT-2 built from a config (no downloads). The loss covers the response
tokens and their EOS only, never the prompt or padding.

In : nothing (the task is generated from --seed)
Out: --out  a Hugging Face directory (config.json, model.safetensors, tokenizer files) that
     AutoModelForCausalLM / AutoTokenizer load without this repo, plus sft_info.json.

    python sft.py --out runs/toy-seed1/sft --seed 1

Departures: the authors fine-tune Pythia on TL;DR references; the embedded task needs a far
larger learning rate (1e-3; 3e-3 diverged on the mixed-size task) because the model has
~100k parameters.
"""
import argparse
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

import common as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--seed", type=int, default=1, help="random seed (data, init, shuffling)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--num_examples", type=int, default=20000, help="prompt/reference pairs")
    p.add_argument("--epochs", type=int, default=10, help="passes over the examples")
    p.add_argument("--batch_size", type=int, default=64, help="examples per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate, linear decay to 0")
    p.add_argument("--n_layer", type=int, default=2, help="transformer layers of the tiny GPT-2")
    p.add_argument("--n_embd", type=int, default=64, help="width of the tiny GPT-2")
    p.add_argument("--n_head", type=int, default=4, help="attention heads of the tiny GPT-2")
    args = p.parse_args(argv)
    if min(args.num_examples, args.epochs, args.batch_size) <= 0:
        raise C.StageError("--num_examples, --epochs and --batch_size must be positive")
    if args.num_examples < args.batch_size:
        raise C.StageError(f"--num_examples ({args.num_examples}) must be at least --batch_size "
                           f"({args.batch_size})")
    return args


def build_model(tokenizer, args) -> GPT2LMHeadModel:
    """A tiny GPT-2 from a config; dropout off (PAPER.md section 4), pad distinct from EOS."""
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        # GPT-2's tanh GELU as one fused kernel (same function to 1e-7; ~14% faster PPO on CPU)
        activation_function="gelu_pytorch_tanh")
    return GPT2LMHeadModel(config)


def main(argv=None):
    args = parse_args(argv)
    C.check_output(args.out)
    device = C.pick_device(args.device)
    C.set_seed(args.seed)
    start = time.time()

    # 1. data: prompts from the train split, one reference response each
    tokenizer = C.build_tokenizer()
    rng = random.Random(args.seed)
    prompts = C.make_prompts(args.num_examples, seed=args.seed)
    references = [C.reference_response(p, rng) for p in prompts]
    query = C.encode_prompts(tokenizer, prompts).to(device)                    # (N, P)
    response = C.encode_responses(tokenizer, references).to(device)           # (N, R)
    mask = C.response_mask(response, tokenizer.eos_token_id)                  # (N, R)

    model = build_model(tokenizer, args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps_per_epoch = args.num_examples // args.batch_size
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total)
    print(f"sft: {sum(p.numel() for p in model.parameters()):,} parameters, {total} steps")

    # 2. train: cross-entropy on the response tokens (EOS included), prompt and pads excluded
    model.train()
    with tqdm(total=total, desc="sft", mininterval=2) as bar:   # closed before any error line
        for epoch in range(args.epochs):
            order = torch.randperm(args.num_examples)
            for step in range(steps_per_epoch):
                idx = order[step * args.batch_size:(step + 1) * args.batch_size]
                q, r, m = query[idx], response[idx], mask[idx]
                with C.autocast(device):
                    logits = C.response_logits(model, q, r, tokenizer.pad_token_id,
                                               tokenizer.eos_token_id, temperature=1.0)  # (B, R, V)
                nll = F.cross_entropy(logits.flatten(0, 1), r.flatten(), reduction="none")
                loss = (nll * m.flatten()).sum() / m.sum()       # mean over real response tokens
                C.check_finite(loss, "loss", "sft", epoch * steps_per_epoch + step + 1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()

    # 3. save a plain Hugging Face directory (safetensors) with the tokenizer beside it
    with C.atomic_output(args.out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        C.write_json(tmp / "sft_info.json", {"args": vars(args), "final_loss": loss.item(),
                                             "seconds": time.time() - start})
    print(f"sft: final loss {loss.item():.3f}, saved {args.out} ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    C.run_main(main)
