"""One small tokenizer interface over sentencepiece ``.model`` files and Hugging Face ``tokenizer.json``.

Everything is offline: sentencepiece and the ``tokenizers`` library read local files only.

``encode`` never adds BOS/EOS by itself: the chat template decides (see :mod:`.templates`), so the
ids of a prompt are exactly the ids of its rendered text. Special-token strings that appear in the
text (``<|eot_id|>``, ``<s>``) are encoded as the special ids, as ``transformers`` does when it
tokenizes a rendered chat template.

A prepared data set records its tokenizer (absolute path and :func:`tokenizer_content_hash`);
:func:`resolve_dataset_tokenizer` turns that record into the tokenizer to train with.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from megatron_tgdpo.data.errors import TokenizerError
from megatron_tgdpo.data.gguf_tokenizer import gguf_tokenizer_dir, is_gguf_file
from megatron_tgdpo.data.templates import (
    LLAMA3_SPECIAL_TOKENS,
    TEMPLATE_NAMES,
    ChatTemplate,
    JinjaTemplate,
    Llama3Template,
    PlainTemplate,
    read_jinja_file,
)

__all__ = [
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "resolve_dataset_tokenizer",
    "tokenizer_content_hash",
]

# Used only when no tokenizer_config.json names the special tokens.
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores a special token as a string or as a serialised AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer(ABC):
    """What the data pipeline needs from a tokenizer. Build one with :func:`load_tokenizer`."""

    kind: str
    path: str
    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int
    add_bos: bool  # whether templates that leave BOS to an id (plain) prepend one
    chat_template: ChatTemplate

    def __init__(self, *, path: Path, config: dict[str, Any]) -> None:
        self.path = str(path)
        self._file_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self._config = config
        self._fingerprint = ""

    # -- encoding ---------------------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special-token strings in it become special ids; no BOS/EOS added."""

    @abstractmethod
    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are written out unless skipped."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None if the vocabulary lacks it."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        ...

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """True for control/special tokens (BOS, EOS, chat markers)."""

    @property
    @abstractmethod
    def special_tokens(self) -> tuple[str, ...]:
        ...

    # -- identity ---------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 over the tokenizer file, the special ids and the chat template: equal fingerprints
        mean prepared data would come out byte-identical."""
        return self._fingerprint

    def _finish(self, *, chat_template: str | None, jinja: tuple[str, str] | None) -> None:
        """Resolve special ids and the template; compute the fingerprint. Called by subclasses."""
        config = self._config
        if config:
            bos_text = _token_text(config.get("bos_token"))
            eos_text = _token_text(config.get("eos_token"))
            pad_text = _token_text(config.get("pad_token"))
        else:
            bos_text = eos_text = pad_text = None
        self.bos_id = self._resolve("bos_token", bos_text, self._default_bos(), required=False)
        eos = self._resolve("eos_token", eos_text, self._default_eos(), required=True)
        assert eos is not None
        self.eos_id = eos
        pad = self._resolve("pad_token", pad_text, self._default_pad(), required=False)
        # Padding is always masked out, so EOS is a safe pad when the tokenizer has no pad token.
        self.pad_id = self.eos_id if pad is None else pad
        self.add_bos = self.bos_id is not None and bool(config.get("add_bos_token", True))
        if self.add_bos and jinja and self.id_to_token(self.bos_id) in jinja[0]:
            # The chat template writes the "BOS" itself as a role marker (ChatML's <|im_start|>): it does
            # not start a sequence, so plain text gets none (as transformers' tokenizer(text) adds none).
            self.add_bos = False
        self.chat_template = self._resolve_template(chat_template, jinja)
        self._compute_fingerprint()

    def _compute_fingerprint(self) -> None:
        digest = hashlib.sha256()
        for part in (
            "megatron_tgdpo.tokenizer.v1",
            self.kind,
            self._file_sha256,
            json.dumps([self.bos_id, self.eos_id, self.pad_id, self.add_bos, self.vocab_size]),
            self.chat_template.identity(),
        ):
            digest.update(part.encode("utf-8") + b"\0")
        self._fingerprint = digest.hexdigest()

    def use_response_suffix(self, suffix: str) -> None:
        """``"eos"`` (default): a response ends at the token closing the assistant turn. ``"template"``:
        it keeps what the Jinja template renders after that token (ChatML's ``\\n``), as TRL does."""
        if suffix == "eos":
            return
        if suffix != "template":
            raise TokenizerError(f"--response-suffix {suffix!r}: expected 'eos' or 'template'")
        if not isinstance(self.chat_template, JinjaTemplate):
            raise TokenizerError(f"--response-suffix template needs a Jinja chat template (auto or a .jinja file); "
                                 f"{self.chat_template.name!r} renders nothing after the end of a response")
        self.chat_template = self.chat_template.keeping_response_suffix()
        self._compute_fingerprint()

    def _resolve(self, key: str, text: str | None, default: int | None, *, required: bool) -> int | None:
        if text is not None:
            token_id = self.token_to_id(text)
            if token_id is None:
                raise TokenizerError(f"{self.path}: tokenizer_config.json {key} {text!r} is not in the vocabulary")
            return token_id
        explicit_null = key in self._config and self._config[key] is None
        if required and (default is None or explicit_null):
            raise TokenizerError(
                f"{self.path}: cannot tell the end-of-sequence token; put a tokenizer_config.json with "
                '"eos_token" next to the tokenizer'
            )
        return None if explicit_null else default

    def _first_known(self, names: Sequence[str]) -> int | None:
        for name in names:
            token_id = self.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def _default_bos(self) -> int | None:
        return self._first_known(_BOS_NAMES)

    def _default_eos(self) -> int | None:
        return self._first_known(_EOS_NAMES)

    def _default_pad(self) -> int | None:
        return self._first_known(_PAD_NAMES)

    def _has_llama3_tokens(self) -> bool:
        return all(self.token_to_id(t) is not None for t in LLAMA3_SPECIAL_TOKENS)

    def _resolve_template(self, name: str | None, jinja: tuple[str, str] | None) -> ChatTemplate:
        if name is None:
            name = "auto" if jinja else ("llama3" if self._has_llama3_tokens() else "plain")
        if name == "plain":
            return PlainTemplate()
        if name == "llama3":
            missing = [t for t in LLAMA3_SPECIAL_TOKENS if self.token_to_id(t) is None]
            if missing:
                raise TokenizerError(
                    f"{self.path}: chat template 'llama3' needs the special tokens {', '.join(missing)}, which this "
                    "tokenizer lacks; use --chat-template plain or a tokenizer_config.json chat_template (auto)"
                )
            return Llama3Template()
        if name == "auto" or name.endswith(".jinja"):
            if name != "auto":
                path = Path(name)
                jinja = (read_jinja_file(path), str(path))
            if not jinja:
                raise TokenizerError(
                    f"{self.path}: --chat-template auto needs a chat_template in tokenizer_config.json (or a "
                    "chat_template.jinja) next to the tokenizer; none found. Use llama3 or plain instead"
                )
            source, origin = jinja
            named = {
                "bos_token": self.id_to_token(self.bos_id) if self.bos_id is not None else "",
                "eos_token": self.id_to_token(self.eos_id),
                "pad_token": self.id_to_token(self.pad_id),
            }
            unk = _token_text(self._config.get("unk_token"))
            if unk is not None:
                named["unk_token"] = unk
            return JinjaTemplate(
                source, special_tokens=named, all_special=self.special_tokens, origin=origin, name=name
            )
        raise TokenizerError(
            f"unknown chat template {name!r}: expected one of {', '.join(TEMPLATE_NAMES)} or a path to a .jinja file"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id}, chat_template={self.chat_template.name!r})"
        )


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, *, path: Path, config: dict[str, Any], chat_template: str | None, jinja: tuple[str, str] | None) -> None:
        import sentencepiece

        super().__init__(path=path, config=config)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as exc:  # noqa: BLE001 - sentencepiece raises OSError/RuntimeError variously
            raise TokenizerError(f"{path}: not a sentencepiece model ({exc})") from exc
        self.vocab_size = self._sp.get_piece_size()
        self._control = frozenset(i for i in range(self.vocab_size) if self._sp.is_control(i))
        # sentencepiece parses user-defined pieces in text itself, but not control pieces (<s>, </s>):
        # split them out so a template's "{{ bos_token }}" becomes the BOS id, as in transformers.
        pieces = sorted((self._sp.id_to_piece(i) for i in self._control), key=len, reverse=True)
        self._control_re = re.compile("|".join(re.escape(p) for p in pieces)) if pieces else None
        self._finish(chat_template=chat_template, jinja=jinja)

    def _default_bos(self) -> int | None:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    def _default_eos(self) -> int | None:
        return self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def _default_pad(self) -> int | None:
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        if self._control_re is None or not self._control_re.search(text):
            return self._sp.encode(text)
        ids: list[int] = []
        start = 0
        for match in self._control_re.finditer(text):
            if match.start() > start:
                ids.extend(self._sp.encode(text[start : match.start()]))
            ids.append(self._sp.piece_to_id(match.group()))
            start = match.end()
        if start < len(text):
            ids.extend(self._sp.encode(text[start:]))
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        # sentencepiece drops control ids when decoding; write them out unless asked to skip them.
        parts: list[str] = []
        run: list[int] = []
        for token_id in (int(i) for i in ids):
            if token_id in self._control:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(self._sp.id_to_piece(token_id))
            else:
                run.append(token_id)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)
        if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id):
            return None
        return token_id

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._control

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return tuple(self._sp.id_to_piece(i) for i in sorted(self._control))


class HFTokenizer(Tokenizer):
    kind = "huggingface"

    def __init__(self, *, path: Path, config: dict[str, Any], chat_template: str | None, jinja: tuple[str, str] | None) -> None:
        import tokenizers

        super().__init__(path=path, config=config)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the Rust side raises a generic Exception
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({exc})") from exc
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self._special_texts = tuple(added[i].content for i in sorted(self._special_ids))
        self._finish(chat_template=chat_template, jinja=jinja)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        token = self._tok.id_to_token(int(token_id))
        if token is None:
            raise KeyError(token_id)
        return token

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return self._special_texts


def _jinja_source(config: dict[str, Any], directory: Path) -> tuple[str, str] | None:
    """The chat template from tokenizer_config.json (a string, or a list of named templates, of which
    "default" is used), else from a chat_template.jinja file."""
    template = config.get("chat_template")
    origin = str(directory / "tokenizer_config.json")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise TokenizerError(f"{origin}: chat_template lists no template named 'default' (has {sorted(named)})")
    if isinstance(template, str) and template:
        return template, origin
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return read_jinja_file(jinja_file), str(jinja_file)
    return None


_CONFIG_FILE = "tokenizer_config.json"
# Files load_tokenizer may read beside the tokenizer file: they are part of the tokenizer's content.
_SIDE_FILES = (_CONFIG_FILE, "chat_template.jinja")


def _tokenizer_file(path: Path) -> Path:
    """The tokenizer file that ``path`` (a file, or a directory holding one) designates."""
    if is_gguf_file(path):  # the tokenizer stored in a GGUF model file, as tokenizer.json
        return gguf_tokenizer_dir(path) / "tokenizer.json"
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return path / name
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if path.is_file():
        return path
    raise TokenizerError(f"{path}: no such tokenizer file or directory")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_content_hash(path: str | os.PathLike) -> str:
    """sha256 identifying the tokenizer at ``path`` (any form :func:`load_tokenizer` takes) by the bytes
    of its files: the tokenizer file and, where present beside it, tokenizer_config.json and
    chat_template.jinja. Where the files are does not enter it (a copied tokenizer keeps its hash);
    any changed byte, or a side file added or removed, changes it. Raises :class:`TokenizerError`
    if there is no tokenizer at ``path``."""
    file = _tokenizer_file(Path(path))
    digest = hashlib.sha256(b"megatron_tgdpo.tokenizer_files.v1\0")
    members = [(f"tokenizer{file.suffix}", file), *((name, file.parent / name) for name in _SIDE_FILES)]
    for role, member in members:
        content = _file_sha256(member) if member.is_file() else "absent"
        digest.update(f"{role}\0{content}\0".encode("utf-8"))
    return digest.hexdigest()


def load_tokenizer(path: str | Path, *, chat_template: str | None = None, response_suffix: str = "eos") -> Tokenizer:
    """Load a tokenizer and attach its chat template.

    ``path``: a sentencepiece ``.model`` file, a Hugging Face ``tokenizer.json``, a directory holding
    one of them (``tokenizer.json`` is preferred), or a GGUF model file (its stored tokenizer and chat
    template, see :mod:`.gguf_tokenizer`). A ``tokenizer_config.json`` in the same directory, if
    any, supplies the special tokens (bos/eos/pad, ``add_bos_token``) and the Jinja ``chat_template``.

    ``response_suffix``: ``"eos"`` or ``"template"`` (:meth:`Tokenizer.use_response_suffix`).

    ``chat_template``: ``"plain"``, ``"llama3"``, ``"auto"`` (the Jinja template of
    tokenizer_config.json / chat_template.jinja), or a path to a ``.jinja`` file. ``None`` picks
    ``auto`` when a Jinja template is present, else ``llama3`` when the tokenizer has the Llama-3 chat
    tokens, else ``plain``.
    """
    file = _tokenizer_file(Path(path))
    directory = file.parent
    config: dict[str, Any] = {}
    config_file = directory / _CONFIG_FILE
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"{config_file}: cannot read ({exc})") from exc
    jinja = _jinja_source(config, directory)
    tokenizer: Tokenizer
    if file.suffix == ".model":
        tokenizer = SentencePieceTokenizer(path=file, config=config, chat_template=chat_template, jinja=jinja)
    elif file.suffix == ".json":
        tokenizer = HFTokenizer(path=file, config=config, chat_template=chat_template, jinja=jinja)
    else:
        raise TokenizerError(f"{file}: expected a sentencepiece .model or a Hugging Face tokenizer.json")
    tokenizer.use_response_suffix(response_suffix)
    return tokenizer


def _short(digest: object) -> str:
    return f"{str(digest)[:16]}..."


def _section(manifest: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = manifest.get(key)
    return value if isinstance(value, Mapping) else {}


def _check_identity(
    candidate: str, manifest: Mapping[str, Any], *, manifest_path: str, label: str, remedy: str
) -> None:
    """Raise :class:`TokenizerError` unless ``candidate`` is the tokenizer ``manifest`` records.

    Current manifests record ``content_sha256``. Older ones only the ``fingerprint`` (files, special
    ids and chat template), checked by loading the candidate with the recorded template; if that
    template can no longer be built (a .jinja file since moved), the older manifest cannot be checked.
    """
    recorded = _section(manifest, "tokenizer")
    expected = recorded.get("content_sha256")
    if isinstance(expected, str):
        actual = tokenizer_content_hash(candidate)
        what = "files' sha256"
    else:
        expected = recorded.get("fingerprint")
        template = _section(manifest, "chat_template").get("name")
        if not isinstance(expected, str) or not isinstance(template, str):
            return  # nothing recorded to compare with
        try:
            actual = load_tokenizer(candidate, chat_template=template).fingerprint()
        except TokenizerError:
            return
        what = "fingerprint"
    if actual != expected:
        raise TokenizerError(
            f"{label} is not the tokenizer the data in {manifest_path} was prepared with: its {what} is "
            f"{_short(actual)}, the manifest records {_short(expected)}, so its token ids would not match the "
            f"data; {remedy}"
        )


def resolve_dataset_tokenizer(
    manifest: Mapping[str, Any], *, override: str | os.PathLike | None, manifest_path: str | os.PathLike
) -> str:
    """The tokenizer to use with a prepared data set, as an absolute path for :func:`load_tokenizer`.

    ``manifest``: the data set's manifest (as read by ``read_manifest``); ``manifest_path``: where it
    was read from, named in errors; ``override``: the tokenizer the user asked for (``--tokenizer``),
    or ``None``.

    * With ``override``: its absolute path (made absolute against the current directory). It must be a
      tokenizer, and, when the manifest records the tokenizer's identity, the same one: same
      :func:`tokenizer_content_hash` as ``tokenizer.content_sha256`` (manifests written before that
      was recorded: same ``fingerprint``). A different tokenizer would give ids that do not match
      the prepared data, so that raises.
    * Without: the recorded ``tokenizer.path``, which is absolute in current manifests; a relative
      path (older manifests) is resolved against the current directory, as it always was. It must
      still exist and have the recorded identity, checked as above.

    Raises :class:`~.errors.TokenizerError`, saying what to do, when the manifest records no path
    and none is given, when the recorded tokenizer "has moved or been deleted", when the override is
    no tokenizer, or when the identity differs. Reads only the tokenizer's files (and, for older
    manifests, loads the tokenizer once to compute its fingerprint).
    """
    where = str(manifest_path)
    if override is not None:
        candidate = os.path.abspath(override)
        _tokenizer_file(Path(candidate))  # raises "no such tokenizer file or directory"
        _check_identity(
            candidate,
            manifest,
            manifest_path=where,
            label=f"--tokenizer {override}",
            remedy="pass the tokenizer the data was prepared with, or prepare the data again with this one",
        )
        return candidate
    path = _section(manifest, "tokenizer").get("path")
    if not isinstance(path, str) or not path:
        raise TokenizerError(f"{where} records no tokenizer path; pass --tokenizer <path>")
    candidate = os.path.abspath(path)
    shown = path if os.path.isabs(path) else f"{path} (relative, looked up from the current directory {os.getcwd()})"
    try:
        _tokenizer_file(Path(candidate))
    except TokenizerError:
        raise TokenizerError(
            f"the tokenizer recorded in {where} at {shown} has moved or been deleted; pass --tokenizer <path>"
        ) from None
    _check_identity(
        candidate,
        manifest,
        manifest_path=where,
        label=f"the tokenizer recorded at {shown}",
        remedy="it changed since the data was prepared: restore it, pass --tokenizer <path> of the original, "
        "or prepare the data again",
    )
    return candidate
