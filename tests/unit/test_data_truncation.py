"""The length policy, case by case, with the exact numbers docs/data.md promises."""
from __future__ import annotations

import pytest

from megatron_tgdpo.data.truncation import LengthPolicy, apply_length_policy

BOS = 1


def _policy(**kwargs) -> LengthPolicy:
    settings = dict(max_seq_length=10, truncation="truncate_prompt", min_response_tokens=1, min_prompt_tokens=3)
    settings.update(kwargs)
    return LengthPolicy(**settings)


def test_fitting_pair_is_unchanged():
    out = apply_length_policy([BOS, 5, 6], [7, 8, 2], [9, 2], policy=_policy(), bos_id=BOS)
    assert (out.prompt, out.chosen, out.rejected, out.dropped) == ([BOS, 5, 6], [7, 8, 2], [9, 2], None)
    assert not out.prompt_truncated and out.responses_truncated == 0


def test_prompt_cut_from_the_left_keeping_bos():
    prompt = [BOS, 11, 12, 13, 14, 15, 16, 17]  # 8 + longest response 4 = 12 > 10: keep 6 prompt tokens
    out = apply_length_policy(prompt, [7, 8, 9, 2], [9, 2], policy=_policy(), bos_id=BOS)
    assert out.prompt == [BOS, 13, 14, 15, 16, 17] and out.prompt_truncated
    assert out.chosen == [7, 8, 9, 2] and out.responses_truncated == 0


def test_prompt_without_bos_is_cut_plainly():
    out = apply_length_policy([11, 12, 13, 14, 15, 16, 17, 18], [7, 8, 9, 2], [2], policy=_policy(), bos_id=BOS)
    assert out.prompt == [13, 14, 15, 16, 17, 18]


def test_response_cut_only_when_it_alone_exceeds_the_room_left_by_the_minimal_prompt():
    prompt = [BOS, 11, 12, 13, 14]
    # Response of 7 = L - M: the prompt shrinks to M = 3, no response cut.
    out = apply_length_policy(prompt, [20, 21, 22, 23, 24, 25, 2], [2], policy=_policy(), bos_id=BOS)
    assert out.prompt == [BOS, 13, 14] and out.responses_truncated == 0 and len(out.chosen) == 7
    # Response of 9 > L - M: prompt at M = 3 tokens, both long responses cut from the right to 7 tokens.
    long_c, long_r = [20, 21, 22, 23, 24, 25, 26, 27, 2], [30, 31, 32, 33, 34, 35, 36, 37, 2]
    out = apply_length_policy(prompt, long_c, long_r, policy=_policy(), bos_id=BOS)
    assert out.prompt == [BOS, 13, 14]
    assert out.chosen == long_c[:7] and out.rejected == long_r[:7] and out.responses_truncated == 2
    assert len(out.prompt) + len(out.chosen) == 10


def test_short_prompt_is_kept_whole_when_below_the_minimum():
    out = apply_length_policy([BOS, 5], list(range(20, 32)), [2], policy=_policy(), bos_id=BOS)
    assert out.prompt == [BOS, 5] and len(out.chosen) == 8 and out.responses_truncated == 1


def test_responses_identical_after_the_cut_are_dropped():
    same_head = [20, 21, 22, 23, 24, 25, 26, 27]
    out = apply_length_policy([BOS, 5, 6], same_head + [2], same_head + [3, 2], policy=_policy(), bos_id=BOS)
    assert out.dropped == "identical_after_truncation"


def test_drop_policy_and_min_response_tokens():
    drop = _policy(truncation="drop")
    assert apply_length_policy([BOS] * 8, [7, 8, 2], [2], policy=drop, bos_id=BOS).dropped == "too_long"
    assert apply_length_policy([BOS, 5], [7, 8, 2], [2], policy=drop, bos_id=BOS).dropped is None
    strict = _policy(min_response_tokens=2)
    assert apply_length_policy([BOS, 5], [7, 8, 2], [2], policy=strict, bos_id=BOS).dropped == "short_response"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(truncation="left"), "truncation must be"),
        (dict(min_response_tokens=0), "min_response_tokens"),
        (dict(min_prompt_tokens=0), "min_prompt_tokens"),
        (dict(min_prompt_tokens=8, min_response_tokens=3), "must not exceed max_seq_length"),
    ],
)
def test_policy_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _policy(**kwargs)
