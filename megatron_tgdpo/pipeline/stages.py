"""Resumable stages: each stage runs once per fingerprint and is skipped while its outputs check out.

A stage's fingerprint is a hash of its *spec*: every setting that shapes its output plus the
fingerprints of the stages it reads. On success the runner writes a marker
(``<workdir>/stages/<name>.json``: fingerprint, outputs, seconds taken) after the outputs are
complete. A later run skips the stage when the marker's fingerprint is the one it would compute now
*and* the stage's own check of its outputs passes (a data manifest and its files, a checkpoint's
metadata, a JSONL file); otherwise it deletes the stage's outputs and runs it again. So an interrupted
run resumes at the first unfinished stage, and a changed setting reruns exactly what depends on it.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["PipelineError", "Stage", "StageRunner", "fingerprint", "prepared_files", "prepared_problem", "scored_problem"]


class PipelineError(RuntimeError):
    """A stage failed; the message names the stage and where its log is."""


def fingerprint(spec: Any) -> str:
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class Stage:
    name: str  # unique in the work directory, e.g. "seed1.dpo"
    spec: dict[str, Any]  # what determines the outputs, upstream fingerprints included
    outputs: list[Path]  # files or directories the stage writes (deleted before a rerun)
    run: Callable[[], None]
    check: Callable[[], Optional[str]] = lambda: None  # why the outputs are unusable, or None
    info: dict[str, Any] = field(default_factory=dict)  # extra facts stored in the marker (e.g. pair counts)


class StageRunner:
    def __init__(self, workdir: Path, *, log: Callable[[str], None] = print) -> None:
        self.workdir = Path(workdir)
        self.markers = self.workdir / "stages"
        self.log = log
        self.timings: dict[str, dict[str, Any]] = {}  # name -> {"seconds", "cpu_seconds", "skipped"}

    def marker_path(self, name: str) -> Path:
        return self.markers / f"{name}.json"

    def marker(self, name: str) -> Optional[dict[str, Any]]:
        try:
            return json.loads(self.marker_path(name).read_text())
        except (OSError, ValueError):
            return None

    def _why_not_done(self, stage: Stage, expected: str) -> Optional[str]:
        marker = self.marker(stage.name)
        if marker is None:
            return "not run yet"
        if marker.get("fingerprint") != expected:
            return "its settings or inputs changed"
        missing = [str(p) for p in stage.outputs if not p.exists()]
        if missing:
            return f"output missing: {missing[0]}"
        return stage.check()

    def run(self, stage: Stage) -> str:
        """Run ``stage`` unless it is done; returns its fingerprint (for the stages that read it)."""
        self.run_together([stage], lambda todo: todo[0].run())
        return fingerprint(stage.spec)

    def run_together(self, stages: list[Stage], run: Callable[[list[Stage]], None]) -> dict[str, str]:
        """Stages whose work is cheaper done at once (e.g. sampling several models in one process):
        ``run(pending)`` does the work of those not done; each is still skipped, checked and marked on
        its own. Returns name -> fingerprint of all of them."""
        pending = []
        for stage in stages:
            expected = fingerprint(stage.spec)
            reason = self._why_not_done(stage, expected)
            if reason is None:
                marker = self.marker(stage.name) or {}
                stage.info.update(marker.get("info", {}))
                self.timings[stage.name] = {"seconds": marker.get("seconds", 0.0),
                                            "cpu_seconds": marker.get("cpu_seconds", 0.0), "skipped": True}
                self.log(f"[skip] {stage.name} (done earlier in {marker.get('seconds', 0.0):.0f}s)")
                continue
            self.log(f"[run ] {stage.name} ({reason})")
            self.marker_path(stage.name).unlink(missing_ok=True)
            for path in stage.outputs:
                _remove(path)
            pending.append(stage)
        if pending:
            started, cpu_started = time.monotonic(), _cpu_seconds()
            names = ", ".join(s.name for s in pending)
            try:
                run(pending)
            except Exception as exc:
                # Keep what did finish (a batch fails part way): a rerun then resumes after it.
                finished = [s for s in pending if all(p.exists() for p in s.outputs) and s.check() is None]
                for stage in finished:
                    self._mark(stage, (time.monotonic() - started) / len(pending),
                               (_cpu_seconds() - cpu_started) / len(pending))
                if isinstance(exc, PipelineError):
                    raise
                raise PipelineError(f"stage {names} failed: {type(exc).__name__}: {exc}") from exc
            seconds = (time.monotonic() - started) / len(pending)
            cpu = (_cpu_seconds() - cpu_started) / len(pending)
            for stage in pending:
                problem = stage.check()
                if problem is not None:
                    raise PipelineError(f"stage {stage.name} finished but its output is unusable: {problem}")
                self._mark(stage, seconds, cpu)
            self.log(f"[done] {names} in {seconds * len(pending):.0f}s ({cpu * len(pending):.0f} CPU-s)")
        return {stage.name: fingerprint(stage.spec) for stage in stages}

    def _mark(self, stage: Stage, seconds: float, cpu: float) -> None:
        self.markers.mkdir(parents=True, exist_ok=True)
        payload = {"stage": stage.name, "fingerprint": fingerprint(stage.spec), "seconds": round(seconds, 2),
                   "cpu_seconds": round(cpu, 2), "outputs": [str(p) for p in stage.outputs], "info": stage.info,
                   "spec": stage.spec}
        tmp = self.marker_path(stage.name).with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        os.replace(tmp, self.marker_path(stage.name))
        self.timings[stage.name] = {"seconds": seconds, "cpu_seconds": cpu, "skipped": False}


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children: on a shared machine the
    wall clock measures the neighbours too, this measures the work."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def prepared_files(prefix: Path) -> list[Path]:
    """The files of a prepared data set (``megatron-tgdpo prepare --output-prefix prefix``): a stage's outputs."""
    return [Path(f"{prefix}.{ext}") for ext in ("bin", "idx", "manifest.json")]


def prepared_problem(prefix: Path) -> Optional[str]:
    """Why the prepared data set at ``prefix`` is not complete and intact, or None: a stage's check."""
    from megatron_tgdpo.data.errors import DataFormatError
    from megatron_tgdpo.data.manifest import check_data_files, read_manifest

    try:
        check_data_files(prefix, read_manifest(prefix))
    except DataFormatError as exc:
        return str(exc)
    return None


def scored_problem(paths: Sequence[Path]) -> Optional[str]:
    """Why these samples files are not complete and scored, or None: a stage's check."""
    from megatron_tgdpo.tasks.jsonl import BadLinesError
    from megatron_tgdpo.tasks.samples import load_sample_records

    for path in paths:
        try:
            load_sample_records(path, require_scores=True)
        except (BadLinesError, OSError) as exc:
            return str(exc).splitlines()[0]
    return None
