"""Turn a validated record into token ids: render with the chat template, tokenize, end with EOS.

Prompt and each response are tokenized separately: the prompt ids are exactly the ids of the
rendered prompt (with the generation prompt), which is what a generation loop starts from; response
ids are the ids of the text that follows it. Where the template puts a token boundary between the
two (Llama-3: the generation prompt ends in ``"\\n\\n"`` that the pre-tokenizer always splits off),
prompt + response ids equal the ids of the whole rendered conversation.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_tgdpo.data.records import PreferenceRecord
from megatron_tgdpo.data.tokenizer import Tokenizer

__all__ = ["EncodedPair", "RenderedPair", "encode_record", "render_record"]


@dataclass(frozen=True, slots=True)
class RenderedPair:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True, slots=True)
class EncodedPair:
    prompt: list[int]
    chosen: list[int]  # response only, ending with the template's end-of-response token
    rejected: list[int]


def render_record(record: PreferenceRecord, tokenizer: Tokenizer) -> RenderedPair:
    """Texts that get tokenized. Raises :class:`~.templates.TemplateRenderError` for unrenderable records."""
    template = tokenizer.chat_template
    return RenderedPair(
        prompt=template.render_prompt(record.prompt),
        chosen=template.render_response(record.prompt, record.chosen),
        rejected=template.render_response(record.prompt, record.rejected),
    )


def _response_ids(text: str, tokenizer: Tokenizer) -> list[int]:
    ids = tokenizer.encode(text)
    rule = tokenizer.chat_template.eos_rule
    if rule == "append" or not ids or not tokenizer.is_special(ids[-1]):
        ids.append(tokenizer.eos_id)
    return ids


def encode_record(record: PreferenceRecord, tokenizer: Tokenizer) -> EncodedPair:
    rendered = render_record(record, tokenizer)
    prompt = tokenizer.encode(rendered.prompt)
    if tokenizer.chat_template.prepend_bos and tokenizer.add_bos:
        prompt.insert(0, tokenizer.bos_id)  # type: ignore[arg-type]  # add_bos implies bos_id is set
    return EncodedPair(
        prompt=prompt,
        chosen=_response_ids(rendered.chosen, tokenizer),
        rejected=_response_ids(rendered.rejected, tokenizer),
    )

