"""probe_rm.py: the hand-built answers and what the probe reports, against independent counts."""
import pytest
import torch

import common as C
import probe_rm as P
import task as T

TASK = T.ToyTask()
PROMPTS = TASK.eval_examples(200)[0]


def test_probing_the_gold_itself_finds_the_optimum_on_every_prompt():
    # the optimum (the prompt's liked colours) must reach task.best_gold, which is computed another
    # way (the best k of the sorted item values), on every prompt
    gold = lambda ps, ts: [TASK.gold_reward(p, t) for p, t in zip(ps, ts)]  # noqa: E731
    result = P.probe(gold, TASK, PROMPTS)
    assert result["hits"] == 1.0
    assert result["favourite_gold"] == pytest.approx(result["best_gold"], abs=1e-9)
    for prompt in PROMPTS:
        answers = P.hand_built_answers(TASK, prompt)
        assert TASK.gold_reward(prompt, answers["optimum"]) == pytest.approx(TASK.best_gold(prompt))
        assert TASK.gold_reward(prompt, answers["off"]) == -1.0            # one mistake, no value
        assert TASK.gold_reward(prompt, answers["repeat"]) == pytest.approx(
            TASK.gold_reward(prompt, answers["one"]) - 1.0)


def test_a_scorer_that_prefers_short_answers_favours_the_empty_one():
    shortest = lambda ps, ts: [-len(t.split()) for t in ts]  # noqa: E731
    result = P.probe(shortest, TASK, PROMPTS)
    assert result["favourite_gold"] == 0.0 and result["hits"] == pytest.approx(
        sum(TASK.best_gold(p) == 0 for p in PROMPTS) / len(PROMPTS))
    assert result["optimum over empty"] == 0.0
    # the optimum is shorter than "all" exactly when the prompt has a disliked colour
    with_disliked = sum(any(TASK.values[w] < 0 for w in p.split()[1:]) for p in PROMPTS)
    assert result["optimum over all"] == pytest.approx(with_disliked / len(PROMPTS))


def test_the_rm_is_read_at_the_eos_minus_its_bias(reward_model, tokenizer):
    # independent reading: the library's own sequence-classification pooling (the last non-pad
    # token, which is the EOS here: one unpadded prompt, answers right-padded)
    reward_model.config.reward_bias = 0.3
    prompt = PROMPTS[0]
    texts = list(P.hand_built_answers(TASK, prompt).values())
    ours = P.rm_scorer(reward_model, tokenizer, TASK)([prompt] * len(texts), texts)
    query = C.encode_prompts(tokenizer, [prompt] * len(texts))
    response = C.encode_responses(tokenizer, texts, TASK.response_len)
    ids = torch.cat([query, response], dim=1)
    with torch.no_grad():
        pooled = reward_model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id)).logits
    assert ours == pytest.approx((pooled.squeeze(1) - 0.3).tolist(), abs=1e-5)


def test_bad_prompt_count_is_an_error():
    with pytest.raises(C.StageError, match="--num_prompts"):
        P.main(["--sft", "unused", "--reward_model", "gold", "--num_prompts", "0"])
