"""Diagnostic: which answers does a reward model prefer? (embedded task only)

A pair accuracy says how often an RM agrees with the gold labels on the pairs it was fitted on; it
does not say where PPO will go. PPO goes where the RM's score is highest, so this script asks the
RM directly: for each held-out prompt it scores a fixed set of hand-built answers and reports

  favourite gold   mean over prompts of the gold of the answer the RM scores highest: what a
                   perfect optimizer of this RM would get among these answers
  hits             share of prompts where that favourite is a gold-best answer
  X over Y         share of prompts where the RM scores answer X strictly above answer Y. X is
                   never the worse answer, except "one over off" on a prompt whose items are all
                   worth less than -mistake_penalty (rare); but often the two tie (one liked colour:
                   optimum = one; none: optimum = empty), so compare with the row of `gold` itself

The answers to prompt `list a b c ...` (liked colours: positive item value):
  optimum   the prompt's liked colours (its gold is task.best_gold when there is no length cost)
  empty     just <eos> (gold 0)
  all       every prompt item
  one       the prompt's most valuable item alone
  off       the most valuable colour that is not in the prompt (one mistake)
  repeat    the most valuable prompt item twice (one mistake)

    python probe_rm.py --sft runs/toy-seed1/sft --reward_model runs/toy-seed1/rm_1 \\
        runs/toy-seed1/ocrm/rm_2

The RM is read as PPO reads it (common.score_responses: the score at the EOS, minus the centring
bias). Passing --reward_model gold probes the gold reward itself: hits 1, and favourite gold = the
best when the task has no length cost.
"""
import argparse

import torch

import common as C
import task as T

ANSWERS = ("optimum", "empty", "all", "one", "off", "repeat")
COMPARISONS = (("optimum", "empty"), ("optimum", "one"), ("optimum", "all"), ("one", "off"),
               ("one", "repeat"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", required=True,
                   help="the run's SFT checkpoint (its task.json and tokenizer)")
    p.add_argument("--reward_model", nargs="+", required=True,
                   help="reward-model directories to probe (reward_model.py --out), or `gold`")
    p.add_argument("--num_prompts", type=int, default=256, help="held-out prompts to probe")
    return p.parse_args(argv)


def hand_built_answers(task: T.ToyTask, prompt: str) -> dict[str, str]:
    """The answers of the module docstring, as response texts (without the <eos>)."""
    items = prompt.split()[1:]
    by_value = sorted(items, key=lambda w: -task.values[w])
    off_prompt = max((w for w in T.ITEMS if w not in items), key=lambda w: task.values[w])
    words = {"optimum": [w for w in items if task.values[w] > 0], "empty": [], "all": items,
             "one": by_value[:1], "off": [off_prompt], "repeat": by_value[:1] * 2}
    return {name: task.answer(words[name]) for name in ANSWERS}


def probe(score, task: T.ToyTask, prompts: list[str]) -> dict:
    """score(prompts, texts) -> one score per answer. Returns the summary of the docstring."""
    favourite_gold, hits = [], 0
    above = {c: 0 for c in COMPARISONS}
    for prompt in prompts:
        answers = hand_built_answers(task, prompt)
        scores = dict(zip(ANSWERS, score([prompt] * len(ANSWERS), list(answers.values()))))
        gold = {name: task.gold_reward(prompt, text) for name, text in answers.items()}
        favourite = max(ANSWERS, key=lambda name: scores[name])       # ties: the first listed
        favourite_gold.append(gold[favourite])
        hits += gold[favourite] == max(gold.values())
        for x, y in COMPARISONS:
            above[(x, y)] += scores[x] > scores[y]
    n = len(prompts)
    return {"favourite_gold": sum(favourite_gold) / n, "hits": hits / n,
            "best_gold": sum(task.best_gold(p) for p in prompts) / n,
            **{f"{x} over {y}": count / n for (x, y), count in above.items()}}


def rm_scorer(rm, tokenizer, task):
    """The RM's score of each answer, as PPO computes it."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    @torch.no_grad()
    def score(prompts, texts):
        query = C.encode_prompts(tokenizer, prompts)                              # (B, P)
        response = C.encode_responses(tokenizer, texts, task.response_len)       # (B, R), + EOS
        return C.score_responses(rm, query, response, pad, eos).tolist()
    return score


def main(argv=None):
    args = parse_args(argv)
    if args.num_prompts < 1:
        raise C.StageError("--num_prompts must be at least 1")
    C.load_policy(args.sft, "cpu")                                  # fail early with a clear message
    task = T.load_task(args.sft)
    if not isinstance(task, T.ToyTask):
        raise C.StageError("probe_rm.py builds answers for the embedded task; this run's SFT "
                           "was made on a text dataset")
    prompts, _ = task.eval_examples(args.num_prompts)
    for path in args.reward_model:
        if path == "gold":
            score = lambda ps, ts: [task.gold_reward(p, t) for p, t in zip(ps, ts)]  # noqa: E731
        else:
            rm, tokenizer = C.load_reward_model(path, "cpu")
            C.check_same_tokenizer(tokenizer, C.load_tokenizer(args.sft), path, args.sft)
            score = rm_scorer(rm.eval(), tokenizer, task)
        result = probe(score, task, prompts)
        print(f"{path}: favourite gold {result['favourite_gold']:.2f} "
              f"(best {result['best_gold']:.2f}), hits {result['hits']:.2f}; "
              + ", ".join(f"{x} over {y} {result[f'{x} over {y}']:.2f}" for x, y in COMPARISONS))


if __name__ == "__main__":
    C.run_main(main)
