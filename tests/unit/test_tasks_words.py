"""The word-list tasks: prompts, answers and the LCS partial-credit verifier against hand-computed cases."""
from __future__ import annotations

import random

import pytest

from megatron_tgdpo.tasks import get_task, make_prompts
from megatron_tgdpo.tasks.words import WORDS, lcs_length, lcs_score, list_words

ANSWER = "cat, dog, lamp, moon, pear, river"  # six words, sorted


def test_lcs_length_hand_cases():
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(["a", "b", "c"], ["a", "b", "c"]) == 3
    assert lcs_length(["c", "b", "a"], ["a", "b", "c"]) == 1
    # a b c d vs b a d c: "a c", "a d", "b c", "b d" all have length 2, nothing longer
    assert lcs_length(["a", "b", "c", "d"], ["b", "a", "d", "c"]) == 2
    assert lcs_length(["x", "a", "y", "b"], ["a", "b"]) == 2


@pytest.mark.parametrize("text, score", [
    ("cat, dog, lamp, moon, pear, river", 1.0),
    # the chat framing, capitals, numbering and punctuation are ignored
    ("Sure! Here is the sorted list:\n1. Cat\n2. Dog\n3. Lamp\n4. Moon\n5. Pear\n6. River.", 1.0),
    # one word out of place: the LCS keeps 5 of 6
    ("cat, lamp, dog, moon, pear, river", 5 / 6),
    # the input order copied (pear, lamp, cat, river, moon, dog): LCS "lamp, moon" or "cat, moon" ... = 2
    ("pear, lamp, cat, river, moon, dog", 2 / 6),
    # a word missing: 5 / 6; a word repeated: 6 / 7 (the longer list is the denominator)
    ("cat, dog, lamp, moon, pear", 5 / 6),
    ("cat, dog, dog, lamp, moon, pear, river", 6 / 7),
    # an invented list word costs like a wrong one; a word outside the vocabulary is ignored
    ("cat, dog, lamp, moon, pear, whale", 5 / 6),
    ("cat, dog, lamp, moon, pear, river, spaceship", 1.0),
    # the whole list reversed: LCS 1
    ("river, pear, moon, lamp, dog, cat", 1 / 6),
    ("", 0.0),
    ("I cannot help with that.", 0.0),
])
def test_word_sort_score_hand_cases(text, score):
    task = get_task("word-sort")
    assert task.score(text, ANSWER) == pytest.approx(score, abs=1e-12)
    assert task.exact_match(text, ANSWER) == (score == 1.0)


def test_scores_do_not_depend_on_parameters():
    text = "cat, lamp, dog, moon"
    assert get_task("word-sort").score(text, ANSWER) == get_task("word-sort", min_length=8, max_length=12).score(text, ANSWER)


def test_list_words_is_case_insensitive_and_in_order():
    assert list_words("Moon, then CAT; then tree!") == ["moon", "cat", "tree"]


@pytest.mark.parametrize("name, check", [("word-sort", sorted), ("word-reverse", lambda w: w[::-1])])
def test_prompts_and_answers(name, check):
    task = get_task(name, min_length=6, max_length=12)
    records = make_prompts(task, num=50, seed=3, split="train")
    for record in records:
        prompt_words = list_words(record["prompt"])
        assert 6 <= len(prompt_words) <= 12
        assert len(set(prompt_words)) == len(prompt_words)
        assert record["answer"] == " " + ", ".join(check(prompt_words))
        assert task.check_answer(record["answer"]) is None
        assert task.score(record["answer"], record["answer"]) == 1.0
    # seeded: the same draw twice
    assert make_prompts(task, num=50, seed=3, split="train") == records


def test_vocabulary_and_parameters_are_checked():
    assert len(set(WORDS)) == len(WORDS) and all(w.isalpha() and w.islower() for w in WORDS)
    assert get_task("word-sort").check_answer("cat, spaceship") is not None
    with pytest.raises(ValueError, match="min_length"):
        get_task("word-sort", min_length=8, max_length=6)


def test_score_is_in_unit_interval_on_random_responses():
    rng = random.Random(0)
    task = get_task("word-sort")
    for _ in range(200):
        text = " ".join(rng.choice(WORDS + ("the", "and")) for _ in range(rng.randrange(15)))
        assert 0.0 <= task.score(text, ANSWER) <= 1.0
