"""Two tokenization choices made beside TRL's: where a response ends (``--response-suffix``) and
whether plain text gets a BOS that the chat template uses as a role marker."""
from __future__ import annotations

import json

from megatron_tgdpo.data.encode import encode_record
from megatron_tgdpo.data.records import Message, PreferenceRecord
from megatron_tgdpo.data.tokenizer import load_tokenizer
from megatron_tgdpo.data.toy_tokenizers import write_llama3_style_tokenizer

# ChatML-shaped, on the toy tokenizer's special tokens: <|start_header_id|> opens every turn,
# <|eot_id|> closes it, and a newline follows.
CHATML_LIKE = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '\\n' + m['content'] + '<|eot_id|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant\\n' }}{% endif %}")
RECORD = PreferenceRecord((Message("user", "Hello there"),), (Message("assistant", "fine"),),
                          (Message("assistant", "bad"),))


def test_response_suffix_template_keeps_the_newline_after_the_turn_end(tmp_path):
    write_llama3_style_tokenizer(tmp_path, chat_template=CHATML_LIKE)
    eos = load_tokenizer(tmp_path)
    kept = load_tokenizer(tmp_path, response_suffix="template")
    end = eos.token_to_id("<|eot_id|>")
    newline = eos.encode("\n")
    plain, trl = encode_record(RECORD, eos), encode_record(RECORD, kept)
    assert plain.chosen[-1] == end and plain.chosen.count(end) == 1
    assert trl.chosen == plain.chosen + newline  # one token longer: the template's "\n", no extra EOS
    # the ids of the whole rendered conversation, as a tokenizer of the full text gives them (TRL's view)
    full = kept.chat_template.render_prompt(RECORD.prompt) + kept.chat_template.render_response(RECORD.prompt, RECORD.chosen)
    assert trl.prompt + trl.chosen == kept.encode(full)
    assert eos.fingerprint() != kept.fingerprint()  # prepared data records which one


def test_plain_text_gets_no_bos_that_the_template_uses_as_a_role_marker(tmp_path):
    roles = tmp_path / "roles"
    write_llama3_style_tokenizer(roles, chat_template=CHATML_LIKE)
    config = json.loads((roles / "tokenizer_config.json").read_text())
    (roles / "tokenizer_config.json").write_text(json.dumps(dict(config, bos_token="<|start_header_id|>")))
    assert load_tokenizer(roles, chat_template="plain").add_bos is False
    assert encode_record(RECORD, load_tokenizer(roles, chat_template="plain")).prompt[0] != \
        load_tokenizer(roles).token_to_id("<|start_header_id|>")
    sequence_start = tmp_path / "llama3"
    write_llama3_style_tokenizer(sequence_start)  # {{ bos_token }} once: a real sequence start
    tok = load_tokenizer(sequence_start, chat_template="plain")
    assert tok.add_bos is True and encode_record(RECORD, tok).prompt[0] == tok.bos_id
