"""Whole-command throughput and peak memory of `bertforge tokenize`.

Runs `python -m bertforge tokenize INPUT --output-dir TMP ...` as a subprocess, --repeat
times into fresh output directories, and prints the median run's
    instances/s, MB/s (input text), peak_rss_mb (largest process of the command tree),
    wall_s, cpu_s (user + sys of all its processes), and speedup_vs_google_quoted
The wall time includes interpreter start, imports and loading the tokenizer, as a user sees
it. Peak RSS comes from os.wait4 on the command, i.e. the largest of the main process and the
worker processes it waited for.

Baseline: Google's create_pretraining_data.py needs TensorFlow and cannot be fetched here,
so a figure measured earlier on this 2-core machine kind is used: 28,895 instances in 17.0 s
wall, 655 MB peak RSS, on the 2.6 MB sample at seq 128 / mask 20 / duplication 5.
speedup_vs_google_quoted = 17.0 s / our wall time on the same input and settings (the
instance counts differ by seed: Google's algorithm draws one target length per document,
so the count swings by +-5% between seeds); it is printed only for those settings.

Default input: the preprocessed real Wikipedia sample, built once into the cache
(sample dump -> `wiki extract` -> `wiki preprocess`, skipped when present) and not timed.
Memory check on a larger input, e.g. the sample concatenated 20x (52 MB):
    mkdir -p /tmp/big && for i in $(seq 20); do cat SAMPLE_TEXT/*/*.txt >> /tmp/big/big.txt; done
    python benchmarks/bench_tokenize.py --input /tmp/big --repeat 1
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOOGLE_WALL_S, GOOGLE_INSTANCES, GOOGLE_PEAK_MB = 17.0, 28_895, 655
GOOGLE_SETTINGS = (128, 20, 5)


def sample_text() -> Path:
    """The preprocessed sample in the cache, built on first use."""
    from bertforge.data.sample import default_cache_dir, fetch_sample
    from bertforge.data.wiki import extract, preprocess

    root = default_cache_dir() / "bench-sample"
    extract(fetch_sample(), root / "extracted", workers=None)
    preprocess(root / "extracted", root / "text", workers=None)
    return root / "text"


def run_once(args: argparse.Namespace, output_dir: Path) -> tuple[float, float, float, str]:
    """(wall seconds, peak RSS MB, CPU seconds, summary line) of one whole command."""
    command = [sys.executable, "-m", "bertforge", "tokenize", str(args.input),
               "--output-dir", str(output_dir), "--sequence-length", str(args.sequence_length),
               "--mask-tokens", str(args.mask_tokens),
               "--duplication-factor", str(args.duplication_factor)]
    if args.workers:
        command += ["--workers", str(args.workers)]
    env = dict(os.environ, BERTFORGE_NO_PROGRESS="1")
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # wait4 reports the command's own peak RSS and that of the children it waited for
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if proc.returncode != 0:
        sys.exit(f"bench_tokenize: the command failed ({proc.returncode}): {' '.join(command)}"
                 f"\n{err}")
    cpu = usage.ru_utime + usage.ru_stime
    return wall, usage.ru_maxrss / 1024, cpu, out.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=None,
                        help="text file or directory (default: the preprocessed sample)")
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--mask-tokens", type=int, default=20)
    parser.add_argument("--duplication-factor", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    args = parser.parse_args()
    if args.input is None:
        args.input = sample_text()
    files = [args.input] if args.input.is_file() else [
        p for p in args.input.rglob("*") if p.is_file() and not p.name.startswith(".")]
    text_mb = sum(p.stat().st_size for p in files) / 1e6
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        for i in range(args.repeat):
            out = Path(tmp) / f"run{i}"
            runs.append(run_once(args, out))
            shutil.rmtree(out)
    walls = [wall for wall, _, _, _ in runs]
    wall = statistics.median(walls)
    peak = max(rss for _, rss, _, _ in runs)
    cpu = statistics.median(cpu for _, _, cpu, _ in runs)
    line = runs[0][3]
    match = re.search(r"([\d,]+) instances out", line)
    instances = int(match.group(1).replace(",", "")) if match else 0
    print(f"input: {args.input} ({text_mb:.2f} MB), seq {args.sequence_length}, mask "
          f"{args.mask_tokens}, duplication {args.duplication_factor}, workers "
          f"{args.workers or 'all'}; runs: {', '.join(f'{w:.2f}' for w in walls)} s")
    print(line)
    print(f"instances/s: {instances / wall:.0f}")
    print(f"MB/s: {text_mb / wall:.2f}")
    print(f"peak_rss_mb: {peak:.0f}")
    print(f"wall_s: {wall:.3f}")
    print(f"cpu_s: {cpu:.3f}")  # user + sys of the command and its workers
    settings = (args.sequence_length, args.mask_tokens, args.duplication_factor)
    if settings == GOOGLE_SETTINGS and 2.0 <= text_mb <= 3.0:
        print(f"google_quoted: {GOOGLE_INSTANCES:,} instances in {GOOGLE_WALL_S} s "
              f"({GOOGLE_INSTANCES / GOOGLE_WALL_S:.0f} instances/s), {GOOGLE_PEAK_MB} MB peak")
        print(f"speedup_vs_google_quoted: {GOOGLE_WALL_S / wall:.1f}")
        print(f"throughput_ratio_vs_google_quoted: "
              f"{instances / wall / (GOOGLE_INSTANCES / GOOGLE_WALL_S):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
