"""The manifest records the tokenizer by absolute path and content hash; resolve_dataset_tokenizer finds
it from any directory, accepts an equal override, and refuses a moved, deleted or different tokenizer
with a message that says what to do. Older manifests (a relative path, no content hash) still work."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from megatron_tgdpo.data.builtin import SYNTHETIC_DIR
from megatron_tgdpo.data.errors import TokenizerError
from megatron_tgdpo.data.manifest import manifest_path, read_manifest
from megatron_tgdpo.data.prepare import PrepareConfig, prepare_preference_data
from megatron_tgdpo.data.tokenizer import load_tokenizer, resolve_dataset_tokenizer, tokenizer_content_hash
from megatron_tgdpo.data.toy_tokenizers import write_llama3_style_tokenizer

SP_MODEL = SYNTHETIC_DIR / "tokenizer.model"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return write_llama3_style_tokenizer(tmp_path_factory.mktemp("llama3_tok"))


def _prepare(workdir: Path, tokenizer: str, *, chat_template: str = "plain") -> Path:
    """Prepare three synthetic pairs from inside ``workdir`` (so relative paths are relative to it)."""
    with open(SYNTHETIC_DIR / "train.jsonl", encoding="utf-8") as handle:
        lines = [next(handle) for _ in range(3)]
    (workdir / "in.jsonl").write_text("".join(lines), encoding="utf-8")
    prepare_preference_data(
        PrepareConfig(
            inputs=("in.jsonl",),
            output_prefix="out/train",
            tokenizer=tokenizer,
            chat_template=chat_template,
            max_seq_length=64,
            min_prompt_tokens=4,
        )
    )
    return workdir / "out" / "train"


@pytest.fixture
def prepared(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A data set prepared with a relative --tokenizer (a copy of the synthetic model in tok/), and the
    tokenizer's absolute path; the current directory is then moved elsewhere."""
    work = tmp_path / "work"
    (work / "tok").mkdir(parents=True)
    shutil.copy(SP_MODEL, work / "tok" / "tokenizer.model")
    monkeypatch.chdir(work)
    prefix = _prepare(work, "tok/tokenizer.model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return prefix, work / "tok" / "tokenizer.model"


def _resolve(prefix: Path, override=None) -> str:
    return resolve_dataset_tokenizer(read_manifest(prefix), override=override, manifest_path=manifest_path(prefix))


def test_manifest_records_absolute_path_and_content_hash(prepared):
    prefix, tokenizer_file = prepared
    recorded = read_manifest(prefix)["tokenizer"]
    assert recorded["path"] == str(tokenizer_file) and os.path.isabs(recorded["path"])
    assert recorded["content_sha256"] == tokenizer_content_hash(tokenizer_file)
    assert recorded["fingerprint"] == load_tokenizer(tokenizer_file, chat_template="plain").fingerprint()


def test_recorded_tokenizer_is_found_from_another_directory(prepared):
    prefix, tokenizer_file = prepared
    path = _resolve(prefix)
    assert path == str(tokenizer_file)
    assert load_tokenizer(path).vocab_size == 38


def test_moved_tokenizer_is_refused_with_what_to_do(prepared, tmp_path):
    prefix, tokenizer_file = prepared
    tokenizer_file.parent.rename(tmp_path / "moved")
    with pytest.raises(TokenizerError) as caught:
        _resolve(prefix)
    assert str(caught.value) == (
        f"the tokenizer recorded in {manifest_path(prefix)} at {tokenizer_file} has moved or been deleted; "
        "pass --tokenizer <path>"
    )
    # ... and the moved copy is accepted as the override: same files, same hash.
    assert _resolve(prefix, override=tmp_path / "moved") == str(tmp_path / "moved")


def test_changed_tokenizer_files_are_refused(prepared):
    prefix, tokenizer_file = prepared
    (tokenizer_file.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(TokenizerError, match="is not the tokenizer the data in .* was prepared with.*changed since"):
        _resolve(prefix)


def test_override_must_be_the_same_tokenizer(prepared, tmp_path, llama_dir):
    prefix, tokenizer_file = prepared
    copy = tmp_path / "elsewhere" / "copy"
    copy.mkdir()
    shutil.copy(tokenizer_file, copy / "tokenizer.model")
    assert _resolve(prefix, override="copy") == str(copy)  # relative to the current directory, made absolute
    with pytest.raises(TokenizerError, match=f"--tokenizer {llama_dir} is not the tokenizer"):
        _resolve(prefix, override=llama_dir)
    with pytest.raises(TokenizerError, match="no such tokenizer"):
        _resolve(prefix, override=tmp_path / "absent")


def test_manifest_without_a_tokenizer_path_needs_an_override(tmp_path):
    with pytest.raises(TokenizerError, match=r"m.json records no tokenizer path; pass --tokenizer <path>"):
        resolve_dataset_tokenizer({"format": "x"}, override=None, manifest_path=tmp_path / "m.json")
    assert resolve_dataset_tokenizer({}, override=SP_MODEL, manifest_path="m.json") == str(SP_MODEL)


def _legacy(manifest: dict, *, path: str) -> dict:
    """What a manifest written before this change looked like: the path as given, no content hash."""
    tokenizer = {k: v for k, v in manifest["tokenizer"].items() if k != "content_sha256"}
    return {**manifest, "tokenizer": {**tokenizer, "path": path}}


def test_old_manifest_with_a_relative_path_resolves_from_the_current_directory(prepared, tmp_path, monkeypatch):
    prefix, tokenizer_file = prepared
    legacy = _legacy(read_manifest(prefix), path="tok/tokenizer.model")
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_dataset_tokenizer(legacy, override=None, manifest_path="old.json") == str(tokenizer_file)
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(TokenizerError, match=r"at tok/tokenizer.model \(relative, .*has moved or been deleted"):
        resolve_dataset_tokenizer(legacy, override=None, manifest_path="old.json")


def test_old_manifest_is_checked_by_its_fingerprint(prepared, tmp_path):
    prefix, tokenizer_file = prepared
    legacy = _legacy(read_manifest(prefix), path=str(tokenizer_file))
    assert resolve_dataset_tokenizer(legacy, override=tokenizer_file, manifest_path="old.json") == str(tokenizer_file)
    other = tmp_path / "other" / "tokenizer.model"
    other.parent.mkdir()
    shutil.copy(SP_MODEL, other)
    # The same model file with other special ids: another fingerprint.
    (other.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>"}))
    with pytest.raises(TokenizerError, match="its fingerprint is"):
        resolve_dataset_tokenizer(legacy, override=other, manifest_path="old.json")


def test_content_hash_covers_the_files_load_tokenizer_reads(tmp_path, llama_dir):
    directory = tmp_path / "tok"
    shutil.copytree(llama_dir, directory)
    first = tokenizer_content_hash(directory)
    assert first == tokenizer_content_hash(directory / "tokenizer.json") == tokenizer_content_hash(llama_dir)
    assert len(first) == 64 and first != tokenizer_content_hash(SP_MODEL)
    (directory / "chat_template.jinja").write_text("{{ messages }}")
    with_jinja = tokenizer_content_hash(directory)
    assert with_jinja != first
    config = directory / "tokenizer_config.json"
    config.write_text(config.read_text() + " ")
    assert tokenizer_content_hash(directory) not in (first, with_jinja)
    (directory / "chat_template.jinja").unlink()
    config.write_text(config.read_text()[:-1])
    assert tokenizer_content_hash(directory) == first
    tokenizer_json = directory / "tokenizer.json"
    tokenizer_json.write_bytes(tokenizer_json.read_bytes() + b" ")
    assert tokenizer_content_hash(directory) != first
    with pytest.raises(TokenizerError, match="no such tokenizer"):
        tokenizer_content_hash(tmp_path / "absent")
