"""Stage 1: supervised fine-tuning (docs/method.md section 3, step 1).

pi_sft <- maximise log pi(reference response | prompt) on prompt -> reference pairs.

Embedded default: the "list the prompt's items" task from common.py, a word-level tokenizer
built locally and a tiny GPT-2 built from a config (no downloads). The loss covers the response
tokens and their EOS only, never the prompt or padding.

The paper's setting (docs/method.md section 6): --model names a causal LM to start from (e.g.
EleutherAI/pythia-1b-deduped) and --dataset a prompt/reference dataset (Huang et al.'s TL;DR, or a
local JSON/JSONL file); --gold_model names the Hugging Face reward model that later stages use as
the gold reward. These choices are the run's task: they are written to task.json here and every
later stage reads them from --sft.

In : nothing (the embedded task is generated from --seed), or --model / --dataset
Out: --out  a Hugging Face directory (config.json, model.safetensors, tokenizer files) that
     AutoModelForCausalLM / AutoTokenizer load without this repo, plus task.json, sft_info.json.

    python sft.py --out runs/toy-seed1/sft --seed 1
    python sft.py --out runs/tldr-seed1/sft --model EleutherAI/pythia-1b-deduped \
        --dataset vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144

Departures: the authors fine-tune Pythia on TL;DR references; the embedded task needs a far
larger learning rate (1e-3; 3e-3 diverged on the mixed-size task) because the model has
~100k parameters.
"""
import argparse
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

import common as C
import task as T


def size_range(text: str) -> list[int]:
    """`2-8` -> [2, 8]; `5` -> [5, 5]."""
    try:
        lo, _, hi = text.partition("-")
        return [int(lo), int(hi or lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX, e.g. 2-8, got {text!r}") from None


def length_weights(text: str):
    """`uniform`, or comma-separated weights of 1, 2, ... items."""
    if text == "uniform":
        return text
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'uniform' or weights like 0.6,0.3,0.1, got "
                                         f"{text!r}") from None


def item_values(text: str) -> list[float]:
    """`equal`, `signed`, or one number per colour."""
    if text in ("equal", "signed"):
        return [1.0] * len(T.ITEMS) if text == "equal" else list(T.SIGNED_VALUES)
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected equal, signed or {len(T.ITEMS)} numbers, got "
                                         f"{text!r}") from None


TOY_KNOBS = ("prompt_sizes", "reference_lengths", "reference_mistake_rate", "mistake_unit",
             "item_values", "mistake_penalty", "length_cost", "separator")
TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--seed", type=int, default=1, help="random seed (data, init, shuffling)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--num_examples", type=int, default=None,
                   help="prompt/reference pairs (default: 20000 for the embedded task, every "
                        "training row of --dataset)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the examples")
    p.add_argument("--batch_size", type=int, default=64, help="examples per optimizer step")
    p.add_argument("--micro_batch_size", type=int, default=0,
                   help="examples per forward/backward; gradients accumulate over a batch "
                        "(0: the whole batch at once)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate, linear decay to 0")
    t = p.add_argument_group("the embedded task (task.py): a named member, and its knobs (unset: "
                             "the member's value); an error with --dataset")
    t.add_argument("--task", default=None, choices=sorted(T.TOY_TASKS),
                   help=f"the member of the task family (default {T.DEFAULT_TOY_TASK})")
    t.add_argument("--prompt_sizes", type=size_range, default=None,
                   help="items per prompt, MIN-MAX (each size equally likely), e.g. 2-8")
    t.add_argument("--reference_lengths", type=length_weights, default=None,
                   help="items per reference answer: 'uniform' (1..n) or weights of 1, 2, ... "
                        "items, e.g. 0.6,0.2,0.1,0.1")
    t.add_argument("--reference_mistake_rate", type=float, default=None,
                   help="chance that a reference item is replaced by a random colour")
    t.add_argument("--mistake_unit", default=None, choices=T.MISTAKE_UNITS,
                   help="what the mistake rate applies to: each item of a reference, or the "
                        "answer as a whole (at most one mistake, whatever its length)")
    t.add_argument("--item_values", type=item_values, default=None,
                   help="gold value of each colour: 'equal' (all 1), 'signed' (8 liked, 8 "
                        f"disliked) or {len(T.ITEMS)} comma-separated numbers in the order "
                        f"{','.join(T.ITEMS)}")
    t.add_argument("--mistake_penalty", type=float, default=None,
                   help="gold lost per mistake (a repeat, an off-prompt colour, a stray `and`)")
    t.add_argument("--length_cost", type=float, default=None,
                   help="gold lost per colour squared: length_cost * k^2 for an answer of k colours")
    t.add_argument("--separator", default=None, choices=("and", "space"),
                   help="what stands between the items of an answer: `and`, or a space only")
    t.add_argument("--n_layer", type=int, default=None, help="transformer layers of the tiny GPT-2 (2)")
    t.add_argument("--n_embd", type=int, default=None, help="width of the tiny GPT-2 (64)")
    t.add_argument("--n_head", type=int, default=None, help="attention heads of the tiny GPT-2 (4)")
    g = p.add_argument_group("the paper's setting: used with --model and --dataset (an error with "
                             "the embedded task)")
    text_flags = []   # every flag of this group after --model / --dataset: set, an error on the toy

    def text_flag(name, **kw):
        text_flags.append(g.add_argument(name, **kw).dest)

    g.add_argument("--model", default=None,
                   help="causal LM name or path to fine-tune instead of the tiny GPT-2, "
                        "e.g. EleutherAI/pythia-1b-deduped")
    g.add_argument("--dataset", default=None,
                   help="hub dataset name or local .json/.jsonl file of prompts and references, "
                        "e.g. vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144")
    text_flag("--dataset_config", default=None, help="the hub dataset's configuration")
    text_flag("--train_splits", type=lambda t: t.split(","), default=None,
              help="comma-separated splits that make the training rows (unset: train)")
    text_flag("--held_out_split", default=None,
              help="the held-out split (unset: validation, else test, else every 10th "
                   "training row)")
    text_flag("--prompt_field", default="query", help="the dataset's prompt column")
    text_flag("--prompt_template", default=None,
              help="build the prompt from named columns instead, e.g. AlpacaFarm's "
                   "'INSTRUCTION: {instruction} \\n\\nINPUT: {input}\\n\\nREPLY:' (\\n "
                   "is a newline)")
    text_flag("--truncate_field", default=None,
              help="with --prompt_template: the column cut (at newlines first) until the "
                   "prompt fits --max_prompt_len")
    text_flag("--response_field", default="reference_response",
              help="the dataset's reference-response column")
    text_flag("--max_prompt_len", type=int, default=512,
              help="prompt tokens kept (the last ones), left-padded")
    text_flag("--response_prefix", default="",
              help="text put before every reference response (' ' after a prompt ending in "
                   "'REPLY:')")
    text_flag("--response_len", type=int, default=53, help="max response tokens (with EOS)")
    text_flag("--gold_model", default="Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",
              help="sequence-classification model (name or path) that later stages use as "
                   "the gold reward, with its own tokenizer and chat template")
    text_flag("--gold_batch_size", type=int, default=16, help="sequences per gold-RM forward")
    text_flag("--gradient_checkpointing", type=int, default=0,
              help="1: recompute activations in the backward pass (less memory, more compute)")
    text_flag("--gold_max_len", type=int, default=1024,
              help="gold-tokenizer tokens kept per sequence (the start is cut)")
    args = p.parse_args(argv)
    if args.prompt_template is not None:     # a newline is hard to pass through run_all.sh's *_ARGS
        args.prompt_template = args.prompt_template.replace("\\n", "\n")
    if args.truncate_field is not None and (args.prompt_template is None or "{" + args.truncate_field
                                            + "}" not in args.prompt_template):
        raise C.StageError("--truncate_field must be a column that --prompt_template names")
    if (args.dataset is None) != (args.model is None):
        raise C.StageError("--model and --dataset go together: the embedded task has its own "
                           "tokenizer and tiny model, a dataset needs a pretrained model's tokenizer")
    if args.dataset is not None:
        given = [f"--{k}" for k in ("task",) + TOY_KNOBS + tuple(TINY_GPT2)
                 if getattr(args, k) is not None]
        if given:
            raise C.StageError(f"{', '.join(given)} shape the embedded task and its tiny GPT-2; "
                               f"they do nothing with --dataset / --model")
    else:
        given = [f"--{k}" for k in text_flags if getattr(args, k) != p.get_default(k)]
        if given:
            raise C.StageError(f"{', '.join(given)} apply to --model / --dataset only; the "
                               f"embedded task ignores them")
        for k, v in TINY_GPT2.items():
            setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.num_examples is None:
        args.num_examples = 20000 if args.dataset is None else 0
    if min(args.epochs, args.batch_size, args.max_prompt_len, args.response_len) <= 0:
        raise C.StageError("--epochs, --batch_size, --max_prompt_len and --response_len must be "
                           "positive")
    if args.num_examples < 0 or (args.dataset is None and args.num_examples == 0):
        raise C.StageError("--num_examples must be positive (0 means every row of --dataset)")
    C.check_micro_batch(args.micro_batch_size, args.batch_size, "--batch_size")
    return args


def make_task(args, tokenizer=None):
    if args.dataset is None:
        return T.ToyTask(T.toy_spec(args.task or T.DEFAULT_TOY_TASK,
                                    **{k: getattr(args, k) for k in TOY_KNOBS}))
    return T.TextTask({"kind": "text", "dataset": args.dataset,
                       "dataset_config": args.dataset_config, "train_splits": args.train_splits,
                       "held_out_split": args.held_out_split, "prompt_field": args.prompt_field,
                       "prompt_template": args.prompt_template,
                       "truncate_field": args.truncate_field,
                       "response_field": args.response_field,
                       "response_prefix": args.response_prefix,
                       "max_prompt_len": args.max_prompt_len, "response_len": args.response_len,
                       "gold_model": args.gold_model, "gold_batch_size": args.gold_batch_size,
                       "gold_max_len": args.gold_max_len})


def build_model(tokenizer, args) -> GPT2LMHeadModel:
    """A tiny GPT-2 from a config; dropout off (docs/method.md section 4), pad distinct from EOS."""
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        # GPT-2's tanh GELU as one fused kernel instead of gelu_new's seven ops: the same function
        # up to float rounding, faster on a CPU (benchmarks/README.md; the test that proves them
        # equal: tests/test_math.py test_eager_and_sdpa_attention_are_the_same_function)
        activation_function="gelu_pytorch_tanh")
    setattr(config, C.ATTENTION_KEY, "eager")                # faster at this size: see common.py
    return C.apply_attention(GPT2LMHeadModel(config))


def main(argv=None):
    args = parse_args(argv)
    C.check_output(args.out)
    device = C.pick_device(args.device)
    C.check_batch_for_ranks(args.batch_size)        # torchrun: a share of each batch per rank
    C.set_seed(args.seed)
    start = time.time()

    # 1. data: prompts from the train split, one reference response each (a dataset's prompts
    #    are fitted to --max_prompt_len with the model's tokenizer)
    task = make_task(args, None if args.model is None else C.load_tokenizer(args.model))
    prompts, references = task.sft_examples(args.num_examples, seed=args.seed)
    if len(prompts) < args.batch_size:
        raise C.StageError(f"{len(prompts)} examples are fewer than --batch_size ({args.batch_size})")
    if args.model is None:
        tokenizer = T.build_tokenizer()
        model = build_model(tokenizer, args)
    else:
        model, tokenizer = C.load_pretrained_policy(args.model, bool(args.gradient_checkpointing))
    query = C.encode_prompts(tokenizer, prompts, task.max_prompt_len).to(device)     # (N, P)
    response = C.encode_responses(tokenizer, references, task.response_len).to(device)  # (N, R)
    mask = C.response_mask(response, tokenizer.eos_token_id)                  # (N, R)

    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    N, micro = len(prompts), args.micro_batch_size or args.batch_size
    steps_per_epoch = N // args.batch_size
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total)
    print(f"sft: {sum(p.numel() for p in model.parameters()):,} parameters, {N} examples, "
          f"{total} steps")

    # 2. train: cross-entropy on the response tokens (EOS included), prompt and pads excluded
    model.train()
    tokens, train_start = 0, time.time()        # real prompt + response tokens through the model
    # the bar is closed before any error line; under torchrun only rank 0 draws it
    with tqdm(total=total, desc="sft", mininterval=2, disable=not C.is_main()) as bar:
        for epoch in range(args.epochs):
            order = torch.randperm(N)
            for step in range(steps_per_epoch):
                idx = order[step * args.batch_size:(step + 1) * args.batch_size]
                real_tokens = mask[idx].sum()
                tokens += (query[idx] != tokenizer.pad_token_id).sum().item() + real_tokens.item()
                opt.zero_grad(set_to_none=True)
                loss = torch.zeros((), device=device)
                # gradient accumulation over micro-batches (of this rank's shard under torchrun)
                for mb in idx[C.shard(len(idx))].split(micro):
                    q, r, m = query[mb], response[mb], mask[mb]
                    with C.autocast(device):
                        logits = C.response_logits(model, q, r, tokenizer.pad_token_id,
                                                   tokenizer.eos_token_id, temperature=1.0)  # (b, R, V)
                    nll = F.cross_entropy(logits.flatten(0, 1), r.flatten(), reduction="none")
                    # mean over the batch's real response tokens, summed micro-batch by micro-batch
                    mb_loss = (nll * m.flatten()).sum() / real_tokens
                    C.check_finite(mb_loss, "loss", "sft", epoch * steps_per_epoch + step + 1)
                    mb_loss.backward()
                    loss += mb_loss.detach()
                C.sum_gradients(model.parameters())  # torchrun: the global batch's gradient
                loss = C.all_sum(loss)
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    speed = C.throughput(device, tokens, time.time() - train_start)

    # 3. save a plain Hugging Face directory (safetensors) with the tokenizer beside it
    C.save_checkpoint(args.out, model, tokenizer, {
        T.TASK_FILE: task.spec,                  # the task every later stage reads (T.load_task)
        "sft_info.json": {"args": vars(args), "final_loss": loss.item(),
                          "seconds": time.time() - start, **speed}})
    print(f"sft: final loss {loss.item():.3f}, {C.throughput_text(speed)}, saved {args.out} "
          f"({time.time() - start:.0f}s)")


if __name__ == "__main__":
    C.run_main(main)
