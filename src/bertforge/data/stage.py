"""Habits shared by every data stage: manifests, skip-if-complete, counted skips, workers.

Each stage (extract, preprocess, vocab, tokenize, pack, shuffle) skips outputs that are
already complete on re-run, counts every dropped document/sentence/instance by reason, ends
with a one-line summary and runs on all cores by default. Keeping those here lets each stage
module hold only its algorithm (progress bars: bertforge/progress.py; write-then-rename
outputs: bertforge/files.py).

Data describes itself: every stage leaves a manifest, `<output_dir>/.bertforge-<stage>.json`,
holding the stage, its settings (`params`), its inputs' fingerprints (resolved path, size,
mtime_ns, and the sha256 of the upstream manifest that lists the input, so inputs regenerated
in place are noticed even when size and mtime survive), each output's size and record count,
and what the records are (`data`: sequence length, mask slots, packing, the tokenizer).
`describe` reads it back for a consumer (pre-training) in one call.

The life of a run (`begin` ... `StageRun.finish`):
- the run takes the folder's lock (`.bertforge.lock`, flock: released when the run ends or
  its process dies); a second run into the same folder stops with the first one's name, and a
  folder holding another stage's outputs is refused (one stage per folder: a glob over it
  would read both);
- complete = the manifest's settings and input fingerprints equal this run's and every
  output exists with its recorded size; then the stored summary is returned, nothing runs;
- otherwise, before anything is written: the old manifest goes first (a run killed from here
  on never looks complete), then the outputs of earlier runs of this stage in the folder (any
  shard count: a glob like packed-*.tfrecord never reads two runs), the temporaries
  (`.<output>.tmp-<pid>`) and spill folders that killed runs left;
- the manifest is written last, after every output was renamed into place.
Cost: one stat per input and output on every start (16k files of a full Wikipedia: ~0.1 s)
and one read of each upstream manifest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertforge.files import atomic_output

MANIFEST_FORMAT = 2  # bump when a manifest's meaning changes: older ones are then redone
_MANIFEST_NAME = re.compile(r"\.bertforge-(?P<stage>[a-z]+)\.json")
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-\d+")  # bertforge.files.atomic_output's names
# Fields of `data` that must agree between shards read together (the tokenizer's too).
_MUST_AGREE = ("packed", "sequence_length", "mask_tokens", "mask_slots",
               "max_sequences_per_pack", "objective", "whole_word_masking")
# What manifests written before a field existed meant by its absence.
_DATA_DEFAULTS = {"objective": "mlm+nsp", "whole_word_masking": False}


def default_workers() -> int:
    """All cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Summary:
    """Counts in, counts out, and skips by reason; printed as the stage's last line."""

    stage: str
    counts: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def add(self, other: "Summary") -> None:
        self.counts.update(other.counts)
        self.skipped.update(other.skipped)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def line(self) -> str:
        parts = [f"{n:,} {name}" for name, n in self.counts.items()]
        text = f"{self.stage}: " + ", ".join(parts)
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{n:,} {r}" for r, n in sorted(self.skipped.items()))
        else:
            text += "; skipped: none"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "counts": dict(self.counts), "skipped": dict(self.skipped)}


# ---------------------------------------------------------------- manifests
def manifest_path(output_dir: Path, stage: str) -> Path:
    return Path(output_dir) / f".bertforge-{stage}.json"


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _upstream_manifest(path: Path, cache: dict) -> str | None:
    """sha256 of the manifest that lists `path` as an output (in its folder or up to two
    folders above, where preprocess and extract keep theirs), or None."""
    for folder in list(path.parents)[:3]:
        if folder not in cache:
            found = []
            for candidate in sorted(folder.glob(".bertforge-*.json")):
                manifest = _read_manifest(candidate)
                if manifest and isinstance(manifest.get("outputs"), dict):
                    found.append((hashlib.sha256(candidate.read_bytes()).hexdigest(),
                                  set(manifest["outputs"])))
            cache[folder] = found
        rel = path.relative_to(folder).as_posix()
        for digest, outputs in cache[folder]:
            if rel in outputs:
                return digest
    return None


def fingerprint(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """What a stage's result depends on, per input: resolved path, size, mtime_ns, and the
    sha256 of the upstream manifest listing the input ("manifest", when there is one)."""
    out, cache = [], {}
    for p in paths:
        path = Path(p).resolve()
        st = path.stat()
        entry = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        upstream = _upstream_manifest(path, cache)
        if upstream is not None:
            entry["manifest"] = upstream
        out.append(entry)
    return out


@dataclass
class StageRun:
    """One run of a stage into `output_dir`: `done` is the stored summary when the output was
    already complete (return it and do nothing), else call `finish` when every output is in
    place."""

    output_dir: Path
    stage: str
    params: dict[str, Any]
    inputs: list[dict[str, Any]]
    done: Summary | None = None

    def finish(self, outputs: Mapping[Path, int | dict | None] | Iterable[Path],
               summary: Summary, data: dict[str, Any] | None = None) -> None:
        """Write the manifest: `outputs` maps each output to its record count (None: not a
        record file, e.g. an index; or a dict of counts such as {"records", "sequences"});
        `data` says what the records are (see `describe`)."""
        if not isinstance(outputs, Mapping):
            outputs = dict.fromkeys(outputs)
        root = self.output_dir.resolve()
        entries = {}
        for path, counts in outputs.items():
            path = Path(path)
            entry = {"size": path.stat().st_size}
            if isinstance(counts, dict):
                entry.update(counts)
            elif counts is not None:
                entry["records"] = int(counts)
            entries[path.resolve().relative_to(root).as_posix()] = entry
        manifest = {"format": MANIFEST_FORMAT, "stage": self.stage,
                    "params": _jsonable(self.params), "inputs": self.inputs,
                    "outputs": dict(sorted(entries.items())), "data": _jsonable(data or {}),
                    "summary": summary.as_dict()}
        with atomic_output(manifest_path(self.output_dir, self.stage)) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1))
        _unlock(self.output_dir)


def _complete(manifest: dict | None, output_dir: Path, stage: str, params: dict,
              inputs: list[dict]) -> bool:
    if not manifest or manifest.get("format") != MANIFEST_FORMAT:
        return False
    if manifest.get("stage") != stage or manifest.get("params") != _jsonable(params):
        return False
    if manifest.get("inputs") != inputs:
        return False
    for rel, entry in manifest.get("outputs", {}).items():
        try:
            if (output_dir / rel).stat().st_size != entry["size"]:
                return False
        except OSError:
            return False
    return True


# Output folders this process writes into -> the descriptor holding their lock. flock locks
# go with the process: a killed run leaves no stale lock (and its forked workers share it).
_LOCKS: dict[Path, int] = {}
LOCK_NAME = ".bertforge.lock"


def _lock(output_dir: Path) -> None:
    """Take the folder's lock, or stop: two runs writing one folder would delete each other's
    spill and outputs."""
    key = output_dir.resolve()
    if key in _LOCKS:  # this process's own earlier run (a library caller after a failure)
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = output_dir / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = lock.read_text(errors="replace").strip() or "another process"
        raise ValueError(f"{output_dir} is being written by {holder}; wait for it to end, or "
                         "give this run another output folder") from None
    _LOCKS[key] = fd


def _claim(output_dir: Path, stage: str) -> None:
    """Name the lock's holder, for the error another run gets (only once this run writes: a
    complete re-run leaves every file of the folder untouched)."""
    fd = _LOCKS[output_dir.resolve()]
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"`bertforge {stage}` (pid {os.getpid()})".encode(), 0)


def _unlock(output_dir: Path) -> None:
    fd = _LOCKS.pop(output_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


def _refuse_other_stages(output_dir: Path, stage: str) -> None:
    """A folder holds one stage's outputs: tokenize, pack and shuffle shards side by side
    would all be read by a glob over the folder."""
    for manifest_file in sorted(output_dir.glob(".bertforge-*.json")):
        match = _MANIFEST_NAME.fullmatch(manifest_file.name)
        manifest = _read_manifest(manifest_file)
        if not match or match.group("stage") == stage or not manifest:
            continue
        present = [rel for rel in manifest.get("outputs", {}) if (output_dir / rel).exists()]
        if present:
            _unlock(output_dir)
            raise ValueError(f"{output_dir} holds `bertforge {match.group('stage')}` output "
                             f"({present[0]}, ...); give `bertforge {stage}` its own output "
                             "folder (a glob over this one would read both)")


def begin(output_dir: str | Path, stage: str, params: dict[str, Any],
          inputs: Iterable[str | Path], *, outputs: str, scratch: Iterable[str] = (),
          nested: bool = False) -> StageRun:
    """Start `stage` into `output_dir` (see the module docstring for the rules).

    outputs: a regex (full match) of the names of this stage's output files. With
      nested=False they sit in `output_dir` and every matching file there is an earlier run's
      and is removed; with nested=True (outputs mirror an input tree) only the previous
      manifest's outputs are removed, and temporaries are looked for in subfolders too.
    scratch: names of spill/staging folders (or files) in `output_dir`, removed."""
    output_dir = Path(output_dir)
    fingerprints = fingerprint(inputs)
    run = StageRun(output_dir, stage, params, fingerprints)
    path = manifest_path(output_dir, stage)
    _lock(output_dir)
    manifest = _read_manifest(path)
    if _complete(manifest, output_dir, stage, params, fingerprints):
        stored = manifest["summary"]
        run.done = Summary(stored.get("stage", stage) + " (already complete)")
        run.done.counts.update(stored.get("counts", {}))
        run.done.skipped.update(stored.get("skipped", {}))
        _unlock(output_dir)
        return run
    _refuse_other_stages(output_dir, stage)
    _claim(output_dir, stage)
    path.unlink(missing_ok=True)  # first: from here on the folder never looks complete
    own = re.compile(outputs)
    old = [output_dir / rel for rel in (manifest or {}).get("outputs", {})
           if isinstance(rel, str) and own.fullmatch(Path(rel).name)]
    folders = ((folder, names) for folder, _, names in os.walk(output_dir)) if nested \
        else [(output_dir, os.listdir(output_dir))]
    for folder, names in folders:
        for name in names:
            temporary = _TEMPORARY.fullmatch(name)
            if temporary and (own.fullmatch(temporary.group("name"))
                              or temporary.group("name") == path.name):
                old.append(Path(folder) / name)
            elif not nested and own.fullmatch(name):
                old.append(Path(folder) / name)
    for name in scratch:
        old.append(output_dir / name)
    for stale in old:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        elif stale.exists() or stale.is_symlink():
            stale.unlink()
    return run


def remove_outputs(output_dir: Path, outputs: str) -> None:
    """Remove the files in `output_dir` whose names match `outputs` (a stage's failed run)."""
    own = re.compile(outputs)
    for path in Path(output_dir).iterdir():
        if own.fullmatch(path.name) and path.is_file():
            path.unlink()


# ---------------------------------------------------------------- the reader
def carried_data(description: dict[str, Any] | None) -> dict[str, Any]:
    """The `data` a stage that only moves records (shuffle) or repacks them (pack) carries
    over from its inputs' `describe`: empty when they are not described."""
    keep = (*_MUST_AGREE, "packing_factor", "tokenizer")
    return {k: v for k, v in (description or {}).items() if k in keep}


def _manifest_listing(path: Path, cache: dict) -> tuple[Path, dict] | tuple[None, None]:
    """(manifest path, manifest) of the manifest in `path`'s folder listing its name."""
    folder = path.parent
    if folder not in cache:
        cache[folder] = [(p, m) for p in sorted(folder.glob(".bertforge-*.json"))
                         if (m := _read_manifest(p)) and m.get("format") == MANIFEST_FORMAT
                         and isinstance(m.get("outputs"), dict)]
    for manifest_file, manifest in cache[folder]:
        if path.name in manifest["outputs"]:
            return manifest_file, manifest
    return None, None


def describe(files_or_dir) -> tuple[dict[str, Any] | None, str]:
    """What the pre-training shards `files_or_dir` (paths, globs or folders, as the loaders
    take them) hold, merged from their stages' manifests: (description, "") or, when some
    shard has no manifest or changed after it was written, (None, the reason).

    Raises ValueError when the shards come from runs that disagree on what a record is
    (packed or not, sequence length, mask slots, tokenizer): reading them together is the
    silent mix-up the manifests exist to stop.

    The description's fields:
      stage                   "tokenize", "pack" or "shuffle" (the last stage that wrote them)
      packed                  True for `bertforge pack` output (several sequences per row)
      sequence_length         S, tokens per record
      mask_tokens             M, masked-LM predictions per sequence (the tokenize setting)
      mask_slots              prediction slots per record (M unpacked; M' packed)
      max_sequences_per_pack  sequences a record holds at most (1 unpacked)
      objective               "mlm+nsp" (sentence pairs with NSP labels) or "mlm" (one
                              segment of contiguous text, NSP labels 0)
      whole_word_masking      whether the static masks cover whole words
      packing_factor          sequences per record over these files (1.0 unpacked)
      files, records          how many shard files, and records in them (from the manifests)
      sequences               pre-training sequences in them (records x packing for
                              shuffled packed shards, whose per-file count is not kept)
      tokenizer               None, or {vocab_sha256, vocab_size, lower_case, vocab_file:
                              absolute path of the vocab.txt copy beside the tokenize output}
      manifests               the manifests read (absolute paths)
      settings                each manifest's stage settings (`params`), in that order
    """
    from bertforge.data.loader import expand_files  # the loaders' own file rules

    files = [Path(f).resolve() for f in expand_files(files_or_dir)]
    cache: dict = {}
    found: dict[Path, dict] = {}
    records = sequences = 0
    for path in files:
        manifest_file, manifest = _manifest_listing(path, cache)
        if manifest is None:
            return None, (f"{path} has no manifest (written by a bertforge stage before "
                          "manifests, or by another tool)")
        entry = manifest["outputs"][path.name]
        if path.stat().st_size != entry.get("size"):
            return None, f"{path} changed after {manifest_file} was written (size differs)"
        found.setdefault(manifest_file, manifest)
        records += entry.get("records", 0)
        factor = manifest.get("data", {}).get("packing_factor") or 1.0
        sequences += entry.get("sequences", round(entry.get("records", 0) * factor))
    first_file, first = next(iter(found.items()))
    data = {**_DATA_DEFAULTS, **first.get("data", {})}
    for manifest_file, manifest in found.items():
        other = {**_DATA_DEFAULTS, **manifest.get("data", {})}
        for key in _MUST_AGREE:
            if other.get(key) != data.get(key):
                raise ValueError(f"shards of {first_file} and {manifest_file} differ in {key} "
                                 f"({data.get(key)} vs {other.get(key)}); read them apart")
        mine, theirs = data.get("tokenizer") or {}, other.get("tokenizer") or {}
        for key in ("vocab_sha256", "lower_case"):
            if mine.get(key) != theirs.get(key):
                raise ValueError(f"shards of {first_file} and {manifest_file} were tokenized "
                                 f"with other tokenizers ({key} differs); read them apart")
    tokenizer = dict(data["tokenizer"]) if data.get("tokenizer") else None
    if tokenizer and tokenizer.get("vocab_file"):  # tokenize keeps a copy beside its shards
        tokenizer["vocab_file"] = str(first_file.parent / tokenizer["vocab_file"])
    return {"stage": first["stage"], "packed": bool(data.get("packed")),
            "sequence_length": data.get("sequence_length"),
            "mask_tokens": data.get("mask_tokens"), "mask_slots": data.get("mask_slots"),
            "max_sequences_per_pack": data.get("max_sequences_per_pack", 1),
            "objective": data["objective"], "whole_word_masking": data["whole_word_masking"],
            "packing_factor": sequences / records if records else 1.0,
            "files": len(files), "records": records, "sequences": sequences,
            "tokenizer": tokenizer,
            "manifests": [str(p) for p in found],
            "settings": [m["params"] for m in found.values()]}, ""
