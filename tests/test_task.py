"""The embedded task family (task.py): its gold reward, its reference answers and its prompts,
checked against hand-computed values and direct counts; and sft.py's flags that choose a member.

    python -m pytest tests/test_task.py -q
"""
import collections
import contextlib
import io
import itertools
import json
import math
import random

import pytest

import common as C
import sft as SFT
import task as T


def values_task(**overrides):
    return T.ToyTask(T.toy_spec("values", **overrides))


# ----------------------------------------------------------------------------------------------
# The gold reward
# ----------------------------------------------------------------------------------------------
def test_gold_of_the_values_member_by_hand():
    task = values_task()
    v = dict(zip(T.ITEMS, T.SIGNED_VALUES))
    assert (v["red"], v["navy"], v["lime"], v["rust"]) == (1.5, 0.8, -0.5, -1.2)
    prompt = "list red lime navy rust"
    cases = {
        "red and navy": 1.5 + 0.8,                       # the best answer: exactly the liked ones
        "red and lime and navy and rust": 1.5 - 0.5 + 0.8 - 1.2,
        "red and red": 1.5 - 1,                          # a repeat is a mistake, worth nothing
        "red and blue": 1.5 - 1,                         # blue is liked, but not in the prompt
        "and red": 1.5 - 1,                              # a stray `and`
        "red and and navy": 1.5 + 0.8 - 2,               # two `and`s next to each other
        "": 0.0,                                         # an answer of just <eos>
    }
    for response, expected in cases.items():
        assert task.gold_reward(prompt, response) == pytest.approx(expected), response
    assert task.gold_reward(prompt, "red and navy", has_eos=False) == T.NO_EOS_GOLD
    assert task.best_gold(prompt) == pytest.approx(2.3)
    assert task.best_gold("list lime rust") == 0.0       # nothing liked: say nothing
    # a mistake penalty of 0.5 halves what every mistake costs
    assert values_task(mistake_penalty=0.5).gold_reward(prompt, "red and red and blue") == \
        pytest.approx(1.5 - 2 * 0.5)


def test_length_cost_charges_the_square_of_the_colours_named():
    task = values_task(length_cost=0.15)
    prompt = "list red blue lime navy"                   # values 1.5, 1.4, -0.5, 0.8
    assert task.gold_reward(prompt, "red") == pytest.approx(1.5 - 0.15)
    assert task.gold_reward(prompt, "red and blue") == pytest.approx(2.9 - 0.6)
    assert task.gold_reward(prompt, "red and blue and navy") == pytest.approx(3.7 - 1.35)
    # a repeat is a colour too: it costs its mistake and makes the answer longer
    assert task.gold_reward(prompt, "red and red") == pytest.approx(1.5 - 1 - 0.6)
    # best: every k, its k most valuable items: k=0 0, 1: 1.35, 2: 2.3, 3: 2.35, 4: 1.8
    assert task.best_gold(prompt) == pytest.approx(2.35)
    brute = max(task.gold_reward(prompt, " and ".join(c)) for k in range(1, 5)
                for c in itertools.permutations(prompt.split()[1:], k))
    assert task.best_gold(prompt) == pytest.approx(brute)


def test_a_space_separator_makes_every_and_a_mistake_and_shortens_the_responses():
    task = values_task(separator="space")
    prompt = "list red lime navy"
    assert task.gold_reward(prompt, "red navy") == pytest.approx(1.5 + 0.8)
    assert task.gold_reward(prompt, "red and navy") == pytest.approx(1.5 + 0.8 - 1)
    assert task.response_len == 9 and values_task().response_len == 16
    rng = random.Random(3)
    refs = [task.reference(p, rng) for p in task.make_prompts(200, seed=1)]
    assert not any("and" in r.split() for r in refs)
    assert max(len(r.split()) for r in refs) == 8


def test_the_items_member_counts_distinct_prompt_items_minus_mistakes():
    task = T.ToyTask(T.toy_spec("items"))
    prompt = "list teal gold navy"
    for response, expected in {"navy and teal": 2, "teal and gold and navy": 3,
                               "teal and teal": 0, "teal and red and gold": 1,
                               "teal and": 0}.items():
        assert task.gold_reward(prompt, response) == expected, response


def test_naming_the_same_colours_in_any_order_is_exactly_the_same_gold():
    """Ties are broken by a coin, so equal golds must be equal to the bit. A plain sum over the
    set of named colours follows the set's iteration order, which depends on insertion order and
    on the process's string-hash seed (PYTHONHASHSEED): the same seed then gave other pairs' labels
    in another process."""
    task = T.ToyTask(T.toy_spec())
    liked = sorted(task.values, key=task.values.get, reverse=True)[:7]
    prompt = "list " + " ".join(liked)
    for r in (2, 3, 4, 5):
        for combo in itertools.combinations(liked, r):
            golds = {task.gold_reward(prompt, " and ".join(p)) for p in itertools.permutations(combo)}
            assert golds == {math.fsum(task.values[c] for c in combo)}, combo


def test_gold_of_a_batch_is_the_gold_of_each():
    task = values_task()
    prompts, texts = ["list red lime", "list gold jade teal"], ["red", "jade and teal"]
    got = task.gold(prompts, texts, [True, False])
    assert got.tolist() == pytest.approx([1.5, T.NO_EOS_GOLD])


# ----------------------------------------------------------------------------------------------
# Prompts and references
# ----------------------------------------------------------------------------------------------
def test_held_out_sets_do_not_depend_on_the_prompt_sizes_and_never_meet_training():
    """Every 10th set of the enumeration over all sizes is held out, whichever sizes a task uses:
    a task with sizes 4-6 holds out exactly the 4-6 sets that the 2-8 task holds out."""
    all_sets = [s for k in range(2, 9) for s in itertools.combinations(T.ITEMS, k)]
    held = {s for i, s in enumerate(all_sets) if i % 10 == 0}
    narrow = T.ToyTask(T.toy_spec("values", prompt_sizes=[4, 6]))
    eval_prompts, _ = narrow.eval_examples(300)
    train_prompts = narrow.make_prompts(3000, seed=1)
    as_set = lambda p: tuple(sorted(p.split()[1:], key=T.ITEMS.index))    # noqa: E731
    assert all(as_set(p) in held for p in eval_prompts)
    assert not any(as_set(p) in held for p in train_prompts)
    assert {len(p.split()) - 1 for p in train_prompts} == {4, 5, 6}


def test_reference_lengths_follow_the_weights_renormalised_per_prompt():
    task = T.ToyTask(T.toy_spec("values", reference_lengths=[0.6, 0.3, 0.1],
                                reference_mistake_rate=0.0, prompt_sizes=[2, 8]))
    rng = random.Random(0)
    counts = collections.defaultdict(collections.Counter)
    for prompt in task.make_prompts(20000, seed=4):
        ref = task.reference(prompt, rng).split(" and ")
        n = len(prompt.split()) - 1
        counts[n][len(ref)] += 1
        assert len(set(ref)) == len(ref) and set(ref) <= set(prompt.split()[1:])   # no mistakes
    # two-item prompts: lengths 1, 2 with weights 0.6, 0.3 -> 2/3, 1/3; others 0.6, 0.3, 0.1
    two = counts[2]
    assert two[1] / sum(two.values()) == pytest.approx(2 / 3, abs=0.03) and set(two) == {1, 2}
    for n in range(3, 9):
        total = sum(counts[n].values())
        for k, p in ((1, 0.6), (2, 0.3), (3, 0.1)):
            assert counts[n][k] / total == pytest.approx(p, abs=0.04), (n, k)
        assert set(counts[n]) == {1, 2, 3}


def test_reference_mistakes_happen_at_their_rate():
    task = values_task(reference_mistake_rate=0.2)
    rng, wrong, total = random.Random(1), 0, 0
    for prompt in task.make_prompts(5000, seed=2):
        items = prompt.split()[1:]
        words = task.reference(prompt, rng).split(" and ")
        total += len(words)
        # a replaced item is a random colour: off the prompt, or a repeat, or by chance the same
        wrong += sum(w not in items for w in words) + len(words) - len(set(words))
    # replacements land off-prompt with probability (16 - n)/16, n ~ 5 on average: ~0.2 * 0.69
    assert 0.10 < wrong / total < 0.19


def mistakes(prompt: str, words: list[str]) -> int:
    """Off-prompt colours and repeats, counted directly."""
    items = prompt.split()[1:]
    return sum(w not in items for w in words) + len(words) - len(set(words))


def test_with_the_answer_as_mistake_unit_the_replacement_chance_does_not_grow_with_length():
    # rate 1: "item" replaces every item (long answers collect several mistakes); "answer"
    # replaces exactly one item, so no reference has two mistakes
    for unit in ("item", "answer"):
        task = values_task(reference_mistake_rate=1.0, mistake_unit=unit)
        rng = random.Random(3)
        counts = [mistakes(p, task.reference(p, rng).split(" and "))
                  for p in task.make_prompts(3000, seed=5)]
        assert (max(counts) <= 1) == (unit == "answer"), unit
    # rate 0.5, "answer": P(a mistake) is about the same for short and long answers (a replacement
    # is harmless when it lands on an unnamed prompt item or on the word it replaces,
    # (n - k + 1) / 16, which shrinks a little with k)
    task = values_task(reference_mistake_rate=0.5, mistake_unit="answer")
    rng, by_length = random.Random(4), collections.defaultdict(list)
    for prompt in task.make_prompts(20000, seed=6):
        words = task.reference(prompt, rng).split(" and ")
        by_length[min(len(words), 4)].append(mistakes(prompt, words) > 0)
    share = {k: sum(v) / len(v) for k, v in by_length.items()}
    assert 0.36 < share[1] < 0.50 and 0.36 < share[4] < 0.54 and abs(share[4] - share[1]) < 0.08
    with pytest.raises(C.StageError, match="mistake unit"):
        values_task(mistake_unit="word")


# ----------------------------------------------------------------------------------------------
# sft.py: a member and its knobs, written to task.json
# ----------------------------------------------------------------------------------------------
def test_flags_choose_a_member_and_change_its_knobs(tmp_path):
    args = SFT.parse_args(["--out", str(tmp_path / "x"), "--task", "items", "--prompt_sizes", "3-5",
                           "--reference_lengths", "0.5,0.5", "--item_values", "signed",
                           "--mistake_penalty", "2", "--mistake_unit", "answer"])
    spec = SFT.make_task(args).spec
    assert spec == {"kind": "toy", "name": "items", "prompt_sizes": [3, 5],
                    "reference_lengths": [0.5, 0.5], "reference_mistake_rate": 0.03,
                    "mistake_unit": "answer", "item_values": list(T.SIGNED_VALUES), "mistake_penalty": 2.0,
                    "length_cost": 0.0, "separator": "and"}
    # written to task.json, and the same task comes back from it
    C.write_json(tmp_path / T.TASK_FILE, SFT.make_task(args).spec)     # as sft.py writes it
    assert json.loads((tmp_path / "task.json").read_text()) == spec
    assert T.load_task(tmp_path).spec == spec
    default = SFT.make_task(SFT.parse_args(["--out", str(tmp_path / "y")])).spec
    assert default == T.toy_spec(T.DEFAULT_TOY_TASK)


@pytest.mark.parametrize("argv, message", [
    (["--prompt_sizes", "1-4"], "prompt sizes"),
    (["--prompt_sizes", "5-3"], "prompt sizes"),
    (["--reference_lengths", "0,0"], "reference lengths"),
    (["--reference_mistake_rate", "1.5"], "mistake rate"),
    (["--item_values", "1,2,3"], "item values"),
    (["--length_cost", "-1"], "length cost"),
    (["--model", "m", "--dataset", "d", "--task", "items"], "--task"),
    (["--model", "m", "--dataset", "d", "--n_layer", "4"], "--n_layer"),
])
def test_bad_task_flags_are_one_line_errors(tmp_path, argv, message):
    with pytest.raises(C.StageError, match=message):
        SFT.make_task(SFT.parse_args(["--out", str(tmp_path / "x"), *argv]))


# every flag of sft.py's "paper's setting" group, each with a value other than its default
PAPER_SETTING_FLAGS = [
    ("--dataset_config", "3.0.0"), ("--train_splits", "a,b"), ("--held_out_split", "val"),
    ("--prompt_field", "post"), ("--prompt_template", "Q: {q}"), ("--response_field", "summary"),
    ("--max_prompt_len", "64"), ("--response_prefix", " "), ("--response_len", "10"),
    ("--gold_model", "some/rm"), ("--gold_batch_size", "4"), ("--gold_max_len", "128"),
    ("--gradient_checkpointing", "1"),
]


@pytest.mark.parametrize("flag, value", PAPER_SETTING_FLAGS)
def test_a_flag_of_the_papers_setting_is_an_error_on_the_embedded_task(tmp_path, flag, value):
    with pytest.raises(C.StageError, match=f"{flag} apply to --model / --dataset only"):
        SFT.parse_args(["--out", str(tmp_path / "x"), flag, value])


def test_the_paper_setting_list_above_is_the_whole_group():
    """Every option of the group's --help section is in PAPER_SETTING_FLAGS (a new flag must be
    added there, so that the test above covers it)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        SFT.parse_args(["--help"])
    section = out.getvalue().split("the paper's setting")[1]
    flags = {w.rstrip(",:") for w in section.split() if w.startswith("--")}
    # --truncate_field is only legal together with a --prompt_template naming it (its own test)
    assert flags - {"--model", "--dataset", "--truncate_field"} == {f for f, _ in PAPER_SETTING_FLAGS}


def test_an_sft_directory_without_task_json_is_refused(tmp_path):
    with pytest.raises(C.StageError, match="task.json"):
        T.load_task(tmp_path)
    (tmp_path / "task.json").write_text(json.dumps({"kind": "toy"}))   # an older sft.py's spec
    with pytest.raises(C.StageError, match="another version"):
        T.load_task(tmp_path)
    assert math.isfinite(sum(T.SIGNED_VALUES))
