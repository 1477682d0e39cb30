"""Tokenizers and chat templates: same ids as ``transformers``' ``apply_chat_template`` for a
Llama-3-style tokenizer (built-in llama3 template and the tokenizer_config.json Jinja path), EOS rules,
special-token handling, fingerprints, and clear load errors."""
from __future__ import annotations

import json
import os

import pytest

from megatron_tgdpo.data.builtin import SYNTHETIC_DIR
from megatron_tgdpo.data.encode import encode_record, render_record
from megatron_tgdpo.data.errors import TokenizerError
from megatron_tgdpo.data.records import parse_record
from megatron_tgdpo.data.tokenizer import load_tokenizer
from megatron_tgdpo.data.toy_tokenizers import LLAMA3_STYLE_JINJA, write_llama3_style_tokenizer

SP_MODEL = SYNTHETIC_DIR / "tokenizer.model"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_llama3_style_tokenizer(tmp_path_factory.mktemp("llama3_tok"))


@pytest.fixture(scope="module")
def hf_tokenizer(llama_dir):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(llama_dir))


def _ids(result) -> list[int]:
    """apply_chat_template returns a list (transformers 4) or a BatchEncoding (5)."""
    return list(result["input_ids"] if hasattr(result, "keys") else result)


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CONVERSATIONS = [
    ([_msg("user", "What is the capital of France?")], [_msg("assistant", "The capital of France is Paris.")]),
    (
        [_msg("system", "  You are a helpful assistant. "), _msg("user", "Sort 7 2 9 4 1234, please!\n")],
        [_msg("assistant", "\n2 4 7 9 1234\n\n")],
    ),
    (
        [_msg("user", "Hello there."), _msg("assistant", "Hi! How are you?"), _msg("user", "Fine; and you're?")],
        [_msg("assistant", "Les élèves 🙂 étudient."), _msg("assistant", "def add(a, b):\n    return a + b")],
    ),
]


@pytest.mark.parametrize("template", ["llama3", "auto"])
@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_ids_match_transformers_apply_chat_template(llama_dir, hf_tokenizer, template, case):
    prompt, response = CONVERSATIONS[case]
    tokenizer = load_tokenizer(llama_dir, chat_template=template)
    record = parse_record(
        json.dumps({"prompt": prompt, "chosen": response, "rejected": [_msg("assistant", "no")]}), source="t", line=1
    )
    encoded = encode_record(record, tokenizer)
    expected_prompt = _ids(hf_tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
    expected_full = _ids(hf_tokenizer.apply_chat_template(prompt + response, tokenize=True))
    assert encoded.prompt == expected_prompt
    assert encoded.prompt + encoded.chosen == expected_full
    eot = tokenizer.token_to_id("<|eot_id|>")
    assert encoded.chosen[-1] == eot and encoded.rejected[-1] == eot
    assert tokenizer.token_to_id("<|end_of_text|>") not in encoded.chosen


def test_builtin_llama3_template_matches_the_jinja_one_when_given_explicitly(llama_dir, hf_tokenizer):
    # The template passed by argument (not read from tokenizer_config.json) gives the same ids too.
    prompt, response = CONVERSATIONS[1]
    expected = _ids(hf_tokenizer.apply_chat_template(prompt + response, chat_template=LLAMA3_STYLE_JINJA, tokenize=True))
    record = parse_record(json.dumps({"prompt": prompt, "chosen": response, "rejected": "x"}), source="t", line=1)
    encoded = encode_record(record, load_tokenizer(llama_dir / "tokenizer.json", chat_template="llama3"))
    assert encoded.prompt + encoded.chosen == expected


def test_default_template_choice(llama_dir, tmp_path):
    assert load_tokenizer(llama_dir).chat_template.name == "auto"
    no_jinja = write_llama3_style_tokenizer(tmp_path / "nojinja", chat_template=None)
    assert load_tokenizer(no_jinja).chat_template.name == "llama3"
    assert load_tokenizer(SP_MODEL).chat_template.name == "plain"


def test_chatml_like_jinja_drops_whitespace_after_turn_end(tmp_path):
    chatml = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}\n{{ m['content'] }}<|eot_id|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant\n{% endif %}"
    )
    directory = write_llama3_style_tokenizer(tmp_path / "chatml", chat_template=chatml)
    tokenizer = load_tokenizer(directory)
    record = parse_record(json.dumps({"prompt": "q", "chosen": "yes", "rejected": "no"}), source="t", line=1)
    assert render_record(record, tokenizer).chosen == "yes<|eot_id|>"
    assert encode_record(record, tokenizer).chosen[-1] == tokenizer.token_to_id("<|eot_id|>")


def test_jinja_turn_without_special_end_gets_eos_appended(tmp_path):
    bare = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tokenizer = load_tokenizer(write_llama3_style_tokenizer(tmp_path / "bare", chat_template=bare))
    record = parse_record(json.dumps({"prompt": "q", "chosen": "yes", "rejected": "no"}), source="t", line=1)
    chosen = encode_record(record, tokenizer).chosen
    assert chosen[-1] == tokenizer.eos_id and tokenizer.decode(chosen[:-1]) == "yes\n"


def test_plain_template_with_sentencepiece():
    tokenizer = load_tokenizer(SP_MODEL, chat_template="plain")
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)
    record = parse_record(json.dumps({"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"}), source="t", line=1)
    encoded = encode_record(record, tokenizer)
    assert encoded.prompt[0] == tokenizer.bos_id and encoded.chosen[-1] == tokenizer.eos_id
    assert tokenizer.decode(encoded.prompt + encoded.chosen) == "<s>sort: 3 1 = 1 3</s>"
    assert tokenizer.decode(encoded.prompt + encoded.chosen, skip_special_tokens=True) == "sort: 3 1 = 1 3"


def test_sentencepiece_parses_control_tokens_in_text():
    tokenizer = load_tokenizer(SP_MODEL)
    ids = tokenizer.encode("<s>sort: 1</s>")
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == "<s>sort: 1</s>"


def test_fingerprint_is_stable_and_tracks_template_and_file(llama_dir, tmp_path):
    first = load_tokenizer(llama_dir, chat_template="llama3").fingerprint()
    assert first == load_tokenizer(llama_dir / "tokenizer.json", chat_template="llama3").fingerprint()
    assert len(first) == 64
    assert first != load_tokenizer(llama_dir, chat_template="auto").fingerprint()
    assert first != load_tokenizer(llama_dir, chat_template="plain").fingerprint()
    other = write_llama3_style_tokenizer(tmp_path / "other", corpus=["a different corpus entirely"], vocab_size=300)
    assert first != load_tokenizer(other, chat_template="llama3").fingerprint()


def test_load_errors_say_what_to_do(tmp_path, llama_dir):
    with pytest.raises(TokenizerError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="needs the special tokens"):
        load_tokenizer(SP_MODEL, chat_template="llama3")
    with pytest.raises(TokenizerError, match="auto needs a chat_template"):
        load_tokenizer(SP_MODEL, chat_template="auto")
    with pytest.raises(TokenizerError, match="unknown chat template 'chatml'"):
        load_tokenizer(llama_dir, chat_template="chatml")
    broken = tmp_path / "broken"
    write_llama3_style_tokenizer(broken)
    (broken / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|not_there|>"}))
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(broken)


def test_jinja_file_template(tmp_path, llama_dir):
    path = tmp_path / "t.jinja"
    path.write_text(LLAMA3_STYLE_JINJA)
    tokenizer = load_tokenizer(llama_dir, chat_template=str(path))
    assert tokenizer.chat_template.name == str(path)
    record = parse_record(json.dumps({"prompt": "q", "chosen": "yes", "rejected": "no"}), source="t", line=1)
    reference = load_tokenizer(llama_dir, chat_template="llama3")
    assert encode_record(record, tokenizer) == encode_record(record, reference)
