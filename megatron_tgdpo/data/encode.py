"""Turn a validated record into token ids: render with the chat template, tokenize, end with EOS.

Prompt and each response are tokenized separately: the prompt ids are exactly the ids of the
rendered prompt (with the generation prompt), which is what a generation loop starts from; response
ids are the ids of the text that follows it. Where the template puts a token boundary between the
two (Llama-3: the generation prompt ends in ``"\\n\\n"`` that the pre-tokenizer always splits off),
prompt + response ids equal the ids of the whole rendered conversation.

Template and tokenizer are code we do not control running on user text: whatever they raise for one
record comes out as :class:`~.templates.TemplateRenderError` or :class:`TokenizeError`, which the
caller reports as that record's problem, so one bad record never hides the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_tgdpo.data.records import PreferenceRecord, SFTRecord
from megatron_tgdpo.data.templates import TemplateRenderError, describe_exception
from megatron_tgdpo.data.tokenizer import Tokenizer

__all__ = ["EncodedPair", "RenderedPair", "TokenizeError", "encode_record", "encode_sft_record", "render_record"]


class TokenizeError(Exception):
    """The tokenizer failed on one rendered text of a record; ``field`` names it (prompt, chosen, rejected)."""

    code = "tokenizer_error"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field, self.reason = field, reason

    def __reduce__(self) -> tuple:
        return type(self), (self.field, self.reason)


@dataclass(frozen=True, slots=True)
class RenderedPair:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True, slots=True)
class EncodedPair:
    prompt: list[int]
    chosen: list[int]  # response only, ending with the template's end-of-response token
    rejected: list[int]  # empty for an SFT record (one response per prompt)


def _rendered(render: Callable[[], str]) -> str:
    try:
        return render()
    except TemplateRenderError:
        raise
    except Exception as exc:  # noqa: BLE001 - a template can raise anything (a Jinja `str + int`: TypeError)
        reason = f"chat template failed: {describe_exception(exc)}"
        raise TemplateRenderError("<template>", reason, "template_error") from None


def render_record(record: PreferenceRecord, tokenizer: Tokenizer) -> RenderedPair:
    """Texts that get tokenized. Raises :class:`~.templates.TemplateRenderError` for unrenderable records."""
    template = tokenizer.chat_template
    return RenderedPair(
        prompt=_rendered(lambda: template.render_prompt(record.prompt)),
        chosen=_rendered(lambda: template.render_response(record.prompt, record.chosen)),
        rejected=_rendered(lambda: template.render_response(record.prompt, record.rejected)),
    )


def _ids(text: str, tokenizer: Tokenizer, *, field: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except Exception as exc:  # noqa: BLE001 - sentencepiece/tokenizers raise RuntimeError, TypeError, bare Exception
        raise TokenizeError(field, f"the tokenizer failed on the rendered {field}: {describe_exception(exc)}") from None


def _response_ids(text: str, tokenizer: Tokenizer, *, field: str) -> list[int]:
    ids = _ids(text, tokenizer, field=field)
    rule = tokenizer.chat_template.eos_rule
    end = len(ids)
    if tokenizer.chat_template.response_suffix == "template":  # the kept suffix is whitespace after the end
        while end and not tokenizer.is_special(ids[end - 1]) and not tokenizer.decode([ids[end - 1]]).strip():
            end -= 1
    if rule == "append" or not end or not tokenizer.is_special(ids[end - 1]):
        ids.append(tokenizer.eos_id)
    return ids


def encode_record(record: PreferenceRecord, tokenizer: Tokenizer) -> EncodedPair:
    """Ids of one record. Raises :class:`~.templates.TemplateRenderError` or :class:`TokenizeError`."""
    rendered = render_record(record, tokenizer)
    prompt = _ids(rendered.prompt, tokenizer, field="prompt")
    if tokenizer.chat_template.prepend_bos and tokenizer.add_bos:
        prompt.insert(0, tokenizer.bos_id)  # type: ignore[arg-type]  # add_bos implies bos_id is set
    return EncodedPair(
        prompt=prompt,
        chosen=_response_ids(rendered.chosen, tokenizer, field="chosen"),
        rejected=_response_ids(rendered.rejected, tokenizer, field="rejected"),
    )



def encode_sft_record(record: SFTRecord, tokenizer: Tokenizer) -> EncodedPair:
    """Ids of one SFT record in the prepared layout: the response as ``chosen``, ``rejected`` empty.
    Exactly the ids a preference record with this prompt and ``chosen`` gets. Raises as :func:`encode_record`."""
    template = tokenizer.chat_template
    prompt = _ids(_rendered(lambda: template.render_prompt(record.prompt)), tokenizer, field="prompt")
    if template.prepend_bos and tokenizer.add_bos:
        prompt.insert(0, tokenizer.bos_id)  # type: ignore[arg-type]  # add_bos implies bos_id is set
    response = _rendered(lambda: template.render_response(record.prompt, record.response))
    return EncodedPair(prompt=prompt, chosen=_response_ids(response, tokenizer, field="response"), rejected=[])
