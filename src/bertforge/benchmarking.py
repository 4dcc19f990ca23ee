"""Run the named entries of a benchmarks.yml, pull metrics out of their output, tabulate them.

The reference system keeps its benchmarks as data, not code: a YAML file of named entries,
each a shell command template whose `{param}` placeholders are filled from a cartesian
product of parameters, and metrics scraped from the command's output by regular expression.
That keeps every benchmark runnable by hand (copy the command) and the runner generic.

Format (benchmarks/benchmarks.yml carries the same description for people adding entries):

    defaults:                      # optional; shared by every entry, an entry's own keys win
      env: {VAR: value}
      timeout: 3600                # seconds
    entry_name:
      description: free text       # optional
      cmd: python script.py --seq {sequence_length}
      parameters:                  # optional; a YAML list, a scalar or a comma string
        sequence_length: 128,512
      env: {VAR: value}            # optional; values may use {param} placeholders too
      timeout: 600                 # optional
      metrics:                     # optional; each a regex string or a mapping
        throughput: {regex: 'throughput: *(.*?) samples/sec', reduction: mean, skip: 1}
        peak_rss_mb: 'peak RSS: *([0-9.,]+) *MB'      # shorthand: reduction mean

Choices, and what they cost:
- Commands run through /bin/sh with the *parent of the spec file's directory* as working
  directory, so `benchmarks/benchmarks.yml` runs its commands from the repository root
  whatever the caller's cwd. `python` in a command is the interpreter running bertforge
  (its directory is put first on PATH), so a virtualenv need not be activated.
- Placeholders follow str.format's escaping (`{{` and `}}` are literal braces), but only
  `{name}` of a declared parameter is substituted; any other `{...}` is an error, as is a
  parameter used nowhere: a typo fails before anything runs, not after an hour.
- Metrics: the first capture group (or the whole match) of every match, commas dropped,
  parsed as a float; `skip` drops the first N matches (warm-up steps); `mean` averages the
  rest, `final` keeps the last. A metric with no match, a non-number, a non-zero exit status
  or a timeout fails that run; the runner goes on and exits 1 if any run failed.
- Output is streamed to stderr as it comes (the table stays alone on stdout) and also kept
  whole in memory for the regexes: a few MB for even a long training log, which is cheaper
  than scanning a temp file twice. PYTHONUNBUFFERED=1 is set so Python children stream.
- The whole spec is validated (keys, regexes, placeholders) before the first run starts.
  Loading and validating costs ~3 ms; the machine description ~5 ms, because it reads
  torch's version from package metadata instead of importing torch (~2 s). The whole
  `--benchmark runner_selftest` command (two runs) takes 0.14 s on the 2-core dev machine.
"""

from __future__ import annotations

import codecs
import datetime as dt
import difflib
import importlib.metadata
import itertools
import json
import os
import platform
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bertforge.data.stage import default_workers
from bertforge.files import atomic_output

ENTRY_KEYS = ("cmd", "parameters", "env", "timeout", "description", "metrics")
DEFAULTS_KEYS = ("env", "timeout")
METRIC_KEYS = ("regex", "reduction", "skip")
REDUCTIONS = ("mean", "final")
TAIL_LINES = 30  # lines of output shown for a failed run when output was not streamed
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


@dataclass(frozen=True)
class Metric:
    name: str
    regex: re.Pattern
    reduction: str = "mean"
    skip: int = 0

    def extract(self, text: str) -> float:
        """The reduced value of every match in `text`; ValueError says why there is none."""
        matches = list(self.regex.finditer(text))[self.skip:]
        if not matches:
            raise ValueError(f"metric {self.name!r}: no match for /{self.regex.pattern}/"
                             + (f" after skipping {self.skip}" if self.skip else ""))
        values = []
        for m in matches:
            raw = m.group(1) if self.regex.groups else m.group(0)
            try:
                values.append(float((raw or "").replace(",", "").strip()))
            except ValueError:
                raise ValueError(f"metric {self.name!r}: matched {raw!r}, not a number") from None
        return values[-1] if self.reduction == "final" else sum(values) / len(values)


@dataclass(frozen=True)
class Entry:
    name: str
    cmd: str
    parameters: dict[str, list[str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    description: str = ""
    metrics: tuple[Metric, ...] = ()

    def expand(self) -> list[dict[str, str]]:
        """Every combination of parameter values, in declaration order (one empty if none)."""
        names = list(self.parameters)
        return [dict(zip(names, combo))
                for combo in itertools.product(*(self.parameters[n] for n in names))]

    def render(self, params: dict[str, str]) -> tuple[str, dict[str, str]]:
        """The command and env of one run, placeholders filled."""
        where = f"benchmark {self.name!r}"
        env = {k: _fill(v, params, f"{where} env {k}") for k, v in self.env.items()}
        return _fill(self.cmd, params, f"{where} cmd"), env


def _fill(template: str, params: dict[str, str], where: str) -> str:
    def sub(m: re.Match) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        name = m.group(1)
        if name not in params:
            raise ValueError(f"{where}: placeholder {{{name}}} is not a parameter (declared: "
                             f"{', '.join(params) or 'none'}); write {{{{ }}}} for literal braces")
        return params[name]
    return _PLACEHOLDER.sub(sub, template)


def _check_keys(found: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in found:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{where}: unknown key {key!r}; {hint}allowed: {', '.join(allowed)}")


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _timeout(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where}: timeout must be a positive number of seconds, got {value!r}")
    return float(value)


def _parameter_values(value: Any, where: str) -> list[str]:
    if isinstance(value, list):
        values = [str(v) for v in value]
    elif isinstance(value, str):
        values = [v.strip() for v in value.split(",")]
    elif isinstance(value, (int, float)):
        values = [str(value)]
    else:
        raise ValueError(f"{where}: give a list, a scalar or a comma string, got {value!r}")
    if not values or any(v == "" for v in values):
        raise ValueError(f"{where}: empty value in {value!r}")
    return values


def _parse_metric(name: str, value: Any, where: str) -> Metric:
    if isinstance(value, str):
        value = {"regex": value}
    value = _mapping(value, where)
    _check_keys(value, METRIC_KEYS, where)
    if not isinstance(value.get("regex"), str):
        raise ValueError(f"{where}: needs a 'regex' string, e.g. 'throughput: *(.*?) samples/sec'")
    try:
        regex = re.compile(value["regex"])
    except re.error as err:
        raise ValueError(f"{where}: bad regex {value['regex']!r}: {err}") from None
    reduction = value.get("reduction", "mean")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    skip = value.get("skip", 0)
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise ValueError(f"{where}: skip must be a whole number >= 0, got {skip!r}")
    return Metric(name, regex, reduction, skip)


def _parse_entry(name: str, raw: Any, defaults: dict, path: Path) -> Entry:
    where = f"{path}: benchmark {name!r}"
    raw = _mapping(raw, where)
    _check_keys(raw, ENTRY_KEYS, where)
    cmd = raw.get("cmd")
    if not isinstance(cmd, str) or not cmd.strip():
        raise ValueError(f"{where}: needs a 'cmd' (the shell command to run)")
    parameters = {str(k): _parameter_values(v, f"{where} parameter {k!r}")
                  for k, v in _mapping(raw.get("parameters"), f"{where} parameters").items()}
    env = {**_mapping(defaults.get("env"), f"{path}: defaults env"),
           **_mapping(raw.get("env"), f"{where} env")}
    env = {str(k): "" if v is None else str(v) for k, v in env.items()}
    timeout = _timeout(raw.get("timeout", defaults.get("timeout")), f"{where} timeout")
    metrics = tuple(_parse_metric(str(m), v, f"{where} metric {m!r}")
                    for m, v in _mapping(raw.get("metrics"), f"{where} metrics").items())
    entry = Entry(name, cmd.strip(), parameters, env, timeout, str(raw.get("description") or ""),
                  metrics)
    # Fill every combination now, so a bad placeholder fails before any run starts.
    used = set()
    for template in (entry.cmd, *entry.env.values()):
        used.update(m.group(1) for m in _PLACEHOLDER.finditer(template) if m.group(1) is not None)
    for params in entry.expand():
        try:
            entry.render(params)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    unused = [p for p in parameters if p not in used]
    if unused:
        raise ValueError(f"{where}: parameter(s) {', '.join(unused)} never used as a "
                         "{placeholder} in cmd or env")
    return entry


def load_spec(path: Path) -> dict[str, Entry]:
    """Parse and validate a benchmarks.yml; entries in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark spec {path} not found (pass --spec PATH)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a mapping of benchmark names to entries")
    defaults = _mapping(raw.pop("defaults", None), f"{path}: defaults")
    _check_keys(defaults, DEFAULTS_KEYS, f"{path}: defaults")
    return {str(name): _parse_entry(str(name), entry, defaults, path) for name, entry in raw.items()}


def select(entries: dict[str, Entry], names: list[str] | None, path: Path) -> list[Entry]:
    """The named entries (all if `names` is empty), each once, in the order asked."""
    if not names:
        return list(entries.values())
    chosen = []
    for name in dict.fromkeys(names):
        if name not in entries:
            close = difflib.get_close_matches(name, list(entries), n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise ValueError(f"{path}: no benchmark named {name!r}; {hint}"
                             f"available: {', '.join(entries)}")
        chosen.append(entries[name])
    return chosen


@dataclass
class Execution:
    returncode: int | None  # None when killed by the timeout
    output: str
    wall_s: float


def execute(command: str, cwd: Path, env: dict[str, str], timeout: float | None,
            stream: bool) -> Execution:
    """Run `command` through the shell; stdout+stderr are captured and, if `stream`, echoed."""
    start = time.monotonic()
    # A new session makes the shell and everything it starts one process group, so a
    # timeout or Ctrl-C kills the whole benchmark, not only /bin/sh.
    proc = subprocess.Popen(command, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts: list[str] = []
    timed_out = False
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            fd = proc.stdout.fileno()
            while True:
                left = None if timeout is None else timeout - (time.monotonic() - start)
                if left is not None and left <= 0:
                    timed_out = True
                    _kill_group(proc)
                    break
                if not sel.select(left):
                    continue
                data = os.read(fd, 65536)
                if not data:
                    break
                text = decoder.decode(data)
                parts.append(text)
                if stream:
                    sys.stderr.write(text)
                    sys.stderr.flush()
    except BaseException:  # Ctrl-C while waiting: do not leave the benchmark running
        _kill_group(proc)
        raise
    finally:
        proc.stdout.close()
    returncode = None if timed_out else proc.wait()
    parts.append(decoder.decode(b"", final=True))
    return Execution(returncode, "".join(parts), time.monotonic() - start)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the group, give the shell 5 s to go, then SIGKILL whatever is left of it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass


def machine_info(cwd: Path) -> dict[str, Any]:
    """Where the numbers were measured: enough to tell two result files apart."""
    cpu_model = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    gpus = _command_output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], cwd)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "usable_cpus": default_workers(),
        "torch": torch_version,
        "gpus": gpus.splitlines() if gpus else [],
        "git_commit": _command_output(["git", "rev-parse", "HEAD"], cwd),
        "hostname": platform.node(),
    }


def _command_output(argv: list[str], cwd: Path) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def run_entry(entry: Entry, params: dict[str, str], cwd: Path, stream: bool) -> dict[str, Any]:
    """One run of one entry: a JSON-ready record with its metrics and status."""
    command, entry_env = entry.render(params)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(entry_env)
    label = " ".join(f"{k}={v}" for k, v in params.items())
    print(f"== {entry.name} {label}".rstrip() + f": {command}", file=sys.stderr, flush=True)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    run = execute(command, cwd, env, entry.timeout, stream)
    metrics: dict[str, float] = {}
    errors = []
    for metric in entry.metrics:
        try:
            metrics[metric.name] = metric.extract(run.output)
        except ValueError as err:
            errors.append(str(err))
    if run.returncode is None:
        status, errors = "timeout", [f"killed after the {entry.timeout:g} s timeout", *errors]
    elif run.returncode != 0:
        status, errors = "failed", [f"exit status {run.returncode}", *errors]
    else:
        status = "missing metric" if errors else "ok"
    if status != "ok":
        print(f"== {entry.name} {label}: {status}: {'; '.join(errors)}", file=sys.stderr)
        if not stream:
            tail = run.output.splitlines()[-TAIL_LINES:]
            print("\n".join(f"   | {line}" for line in tail), file=sys.stderr)
    return {"name": entry.name, "params": params, "command": command, "metrics": metrics,
            "wall_s": round(run.wall_s, 3), "returncode": run.returncode, "status": status,
            "error": "; ".join(errors) or None, "started": started}


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.4g}"


def format_table(runs: list[dict[str, Any]]) -> str:
    """A plain-text table: entry, parameters, one column per metric, wall time, status."""
    metric_names = list(dict.fromkeys(m for r in runs for m in r["metrics"]))
    header = ["entry", "parameters", *metric_names, "wall_s", "status"]
    rows = [[r["name"], " ".join(f"{k}={v}" for k, v in r["params"].items()) or "-",
             *(_number(r["metrics"].get(m)) for m in metric_names), f"{r['wall_s']:.2f}",
             r["status"]] for r in runs]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    numeric = [False, False, *[True] * (len(metric_names) + 1), False]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def run_benchmarks(spec: Path, names: list[str] | None = None,
                   output: Path = Path("benchmark-results.json"), *, stream: bool = True) -> int:
    """Run the chosen entries of `spec`, print a table, write `output`; 0 if every run passed."""
    spec = Path(spec)
    entries = select(load_spec(spec), names, spec)
    cwd = spec.resolve().parent.parent
    result = {"spec": str(spec), "cwd": str(cwd), "machine": machine_info(cwd), "runs": []}
    try:
        for entry in entries:
            for params in entry.expand():
                result["runs"].append(run_entry(entry, params, cwd, stream))
    finally:
        # Written even after Ctrl-C, so the runs that finished are not lost.
        if result["runs"]:
            with atomic_output(Path(output)) as tmp:
                tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(format_table(result["runs"]))
    failed = sum(r["status"] != "ok" for r in result["runs"])
    print(f"benchmark: {len(result['runs']) - failed} of {len(result['runs'])} runs passed; "
          f"results in {output}")
    return 1 if failed else 0
