"""Chat templates: how a prompt and a response become the text that is tokenized.

A template renders two strings per side of a pair:

* the **prompt text**: the prompt messages plus the generation prompt (what a model is given to
  answer), so prompt tokens are exactly the tokens a generation loop would start from;
* the **response text**: what follows the prompt text in the rendered conversation.

and says what ends a response (``eos_rule``):

* ``"append"``: the tokenizer's EOS id is appended to every response (``plain``);
* ``"turn_end"``: the special token that closes the assistant turn, as rendered by the template,
  is the end; EOS is appended only if the rendered turn does not end in a special token
  (``llama3``, and Jinja templates).

Three kinds: ``plain`` (no formatting), ``llama3`` (built in, the Llama-3 instruct format) and
Jinja (the ``chat_template`` of a Hugging Face ``tokenizer_config.json``, name ``auto``).
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal, Sequence

from megatron_tgdpo.data.errors import TokenizerError
from megatron_tgdpo.data.records import Message

__all__ = [
    "LLAMA3_SPECIAL_TOKENS",
    "TEMPLATE_NAMES",
    "ChatTemplate",
    "JinjaTemplate",
    "Llama3Template",
    "PlainTemplate",
    "TemplateRenderError",
    "describe_exception",
]

TEMPLATE_NAMES = ("plain", "llama3", "auto")

LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

EosRule = Literal["append", "turn_end"]


class TemplateRenderError(Exception):
    """A record the template cannot render; becomes a per-record problem, not a crash."""

    def __init__(self, field: str, reason: str, code: str) -> None:
        super().__init__(reason)
        self.field, self.reason, self.code = field, reason, code

    def __reduce__(self) -> tuple:
        # The default would call cls(reason) when unpickling (in the parent of a worker) and fail.
        return type(self), (self.field, self.reason, self.code)


def describe_exception(exc: BaseException, *, limit: int = 300) -> str:
    """``Type: message`` of an exception raised by third-party code, cut to ``limit`` characters (a
    tokenizer may quote a whole document in its message)."""
    message = str(exc)
    if len(message) > limit:
        message = message[:limit] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class ChatTemplate(ABC):
    name: str
    eos_rule: EosRule
    prepend_bos: bool  # True when the template leaves BOS to be added as an id (it renders no BOS text)
    end_of_response: str  # what "EOS" means for this template, in words, for the manifest and docs
    response_suffix: str = "eos"  # "template": the text the template renders after the turn's end is kept

    @abstractmethod
    def render_prompt(self, prompt: Sequence[Message]) -> str:
        """Prompt messages plus the generation prompt."""

    @abstractmethod
    def render_response(self, prompt: Sequence[Message], response: Sequence[Message]) -> str:
        """The text that follows :meth:`render_prompt` in the rendered conversation."""

    @abstractmethod
    def identity(self) -> str:
        """Stable text that changes whenever the rendering would; part of the tokenizer fingerprint."""


class PlainTemplate(ChatTemplate):
    """No formatting: contents concatenated (a blank line between messages of the same part), no
    separator between prompt and response (the data carries it, as in TRL's standard form, e.g.
    prompt ``"Q: 2+2 ="`` and response ``" 4"``); BOS as an id if the tokenizer has one; EOS appended."""

    name = "plain"
    eos_rule: EosRule = "append"
    prepend_bos = True
    end_of_response = "the tokenizer's EOS id, appended to every response"

    def render_prompt(self, prompt: Sequence[Message]) -> str:
        return "\n\n".join(m.content for m in prompt)

    def render_response(self, prompt: Sequence[Message], response: Sequence[Message]) -> str:
        return "\n\n".join(m.content for m in response)

    def identity(self) -> str:
        return "plain:v1"


class Llama3Template(ChatTemplate):
    """The Llama-3 instruct format; message contents are stripped of surrounding whitespace, as the
    official template does, so ids match ``apply_chat_template`` with Meta's template."""

    name = "llama3"
    eos_rule: EosRule = "turn_end"
    prepend_bos = False  # rendered as <|begin_of_text|>
    end_of_response = "<|eot_id|> closing the assistant turn (no <|end_of_text|> is added)"

    @staticmethod
    def _turn(message: Message) -> str:
        return f"<|start_header_id|>{message.role}<|end_header_id|>\n\n{message.content.strip()}<|eot_id|>"

    def render_prompt(self, prompt: Sequence[Message]) -> str:
        turns = "".join(self._turn(m) for m in prompt)
        return f"<|begin_of_text|>{turns}<|start_header_id|>assistant<|end_header_id|>\n\n"

    def render_response(self, prompt: Sequence[Message], response: Sequence[Message]) -> str:
        # The first assistant header is already in the prompt (generation prompt).
        first, rest = response[0], response[1:]
        return f"{first.content.strip()}<|eot_id|>" + "".join(self._turn(m) for m in rest)

    def identity(self) -> str:
        return "llama3:v1"


def _raise_exception(message: str) -> None:
    raise TemplateRenderError("<template>", f"chat template raised: {message}", "template_error")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


class JinjaTemplate(ChatTemplate):
    """A Hugging Face style Jinja chat template, rendered the way ``transformers`` renders it
    (sandboxed, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``).

    The response text is the full conversation's rendering minus the prompt rendering (with the
    generation prompt); a template for which the latter is not a prefix of the former cannot be used
    for preference data, and each such record is reported. Whitespace after the special token that
    closes the assistant turn (ChatML's trailing newline, say) is dropped: the model stops at that
    token, so the text after it is never generated.
    """

    name = "auto"
    eos_rule: EosRule = "turn_end"
    prepend_bos = False  # Jinja templates render {{ bos_token }} themselves when the model wants it
    end_of_response = (
        "the special token closing the assistant turn as the Jinja template renders it (trailing "
        "whitespace dropped); the tokenizer's EOS id is appended if the turn ends in no special token"
    )

    def __init__(
        self,
        source: str,
        *,
        special_tokens: dict[str, str],
        all_special: Sequence[str],
        origin: str,
        name: str = "auto",
    ) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template from {origin} does not compile: {exc}") from exc
        self.name = name
        self.source = source
        self.origin = origin
        self._special_tokens = dict(special_tokens)
        self._all_special = tuple(s for s in all_special if s)

    def _render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except TemplateRenderError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateRenderError("<template>", f"chat template failed: {exc}", "template_error") from None

    def render_prompt(self, prompt: Sequence[Message]) -> str:
        return self._render(prompt, add_generation_prompt=True)

    def render_response(self, prompt: Sequence[Message], response: Sequence[Message]) -> str:
        head = self.render_prompt(prompt)
        full = self._render([*prompt, *response], add_generation_prompt=False)
        if not full.startswith(head):
            raise TemplateRenderError(
                "<template>",
                "the rendered prompt (with generation prompt) is not a prefix of the rendered conversation, "
                "so the response cannot be cut out; use --chat-template llama3 or plain, or a template that "
                "renders the prompt identically in both cases",
                "template_mismatch",
            )
        tail = full[len(head):]
        stripped = tail.rstrip()
        if self.response_suffix == "eos" and stripped != tail and any(stripped.endswith(s) for s in self._all_special):
            tail = stripped
        return tail

    def keeping_response_suffix(self) -> "JinjaTemplate":
        """This template, keeping the whitespace rendered after the turn's closing token (TRL's choice)."""
        import copy

        out = copy.copy(self)
        out.response_suffix = "template"
        out.end_of_response = ("the special token closing the assistant turn, followed by the whitespace the "
                               "Jinja template renders after it; EOS is appended if the turn ends in no special token")
        return out

    def identity(self) -> str:
        return "jinja:v1:" + self.source if self.response_suffix == "eos" else "jinja:v1:suffix=template:" + self.source


def read_jinja_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenizerError(f"cannot read chat template {path}: {exc}") from exc
