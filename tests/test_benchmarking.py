"""Tests of the benchmark runner: spec validation, parameter expansion, metrics, statuses, JSON.

Every run here is a real shell command (`python -c ...`, about 20 ms each), so the whole
file takes a couple of seconds; the timeout test is the slowest at about 0.5 s.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bertforge.benchmarking import Metric, load_spec, run_benchmarks
from bertforge.cli import main

REPO = Path(__file__).resolve().parents[1]


def write_spec(tmp_path: Path, text: str) -> Path:
    """A spec at tmp_path/bench/spec.yml, so commands run from tmp_path."""
    path = tmp_path / "bench" / "spec.yml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def printer(*lines: str) -> str:
    """A YAML-quoted shell command printing `lines` with the python on the runner's PATH."""
    code = "; ".join(f"print({line!r})" for line in lines)
    return json.dumps(f"python -c {shlex.quote(code)}")  # JSON strings are YAML scalars


def test_parameters_expand_as_cartesian_product_of_list_comma_string_and_scalar(tmp_path):
    spec = write_spec(tmp_path, """
        grid:
          cmd: echo {a} {b} {c}
          parameters:
            a: [1, 2]
            b: "x, y,z"
            c: 7
    """)
    entry = load_spec(spec)["grid"]
    combos = entry.expand()
    assert len(combos) == 6
    assert combos[0] == {"a": "1", "b": "x", "c": "7"}
    assert combos[-1] == {"a": "2", "b": "z", "c": "7"}
    assert {(c["a"], c["b"]) for c in combos} == {(a, b) for a in "12" for b in "xyz"}
    assert entry.render(combos[4])[0] == "echo 2 y 7"


def test_no_parameters_gives_one_run_and_double_braces_are_literal(tmp_path):
    spec = write_spec(tmp_path, """
        plain:
          cmd: >-
            python -c "print({{'a': 1}})"
    """)
    entry = load_spec(spec)["plain"]
    assert entry.expand() == [{}]
    assert entry.render({})[0] == "python -c \"print({'a': 1})\""


def test_metric_mean_final_skip_and_thousands_commas():
    text = "throughput: 1,000.5 samples/sec\nnoise\nthroughput: 2000 samples/sec\n" \
           "throughput:3,000.5 samples/sec\n"
    regex = __import__("re").compile(r"throughput: *(.*?) samples/sec")
    assert Metric("t", regex, "mean").extract(text) == pytest.approx(2000.3333, rel=1e-6)
    assert Metric("t", regex, "final").extract(text) == 3000.5
    assert Metric("t", regex, "mean", skip=1).extract(text) == pytest.approx(2500.25)
    with pytest.raises(ValueError, match="no match.*after skipping 3"):
        Metric("t", regex, "mean", skip=3).extract(text)
    with pytest.raises(ValueError, match="'fast', not a number"):
        Metric("t", regex, "final").extract("throughput: fast samples/sec")


def test_missing_metric_fails_that_entry_others_still_run(tmp_path, capsys):
    spec = write_spec(tmp_path, f"""
        broken:
          cmd: {printer("nothing to see")}
          metrics:
            throughput: 'throughput: *(.*?) samples/sec'
        good:
          cmd: {printer("throughput: 10 samples/sec", "throughput: 30 samples/sec")}
          metrics:
            throughput: 'throughput: *(.*?) samples/sec'
    """)
    out = tmp_path / "results.json"
    assert run_benchmarks(spec, None, out) == 1
    runs = {r["name"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["broken"]["status"] == "missing metric"
    assert runs["broken"]["returncode"] == 0
    assert "throughput" in runs["broken"]["error"]
    assert runs["good"]["status"] == "ok"
    assert runs["good"]["metrics"] == {"throughput": 20.0}
    table = capsys.readouterr().out
    assert "missing metric" in table and "1 of 2 runs passed" in table


def test_nonzero_exit_status_fails_even_with_metrics_and_tail_is_shown(tmp_path, capsys):
    spec = write_spec(tmp_path, """
        crash:
          cmd: >-
            python -c "print('throughput: 5 samples/sec'); print('last words'); raise SystemExit(3)"
          metrics:
            throughput: 'throughput: *(.*?) samples/sec'
    """)
    out = tmp_path / "results.json"
    assert run_benchmarks(spec, ["crash"], out, stream=False) == 1
    (run,) = json.loads(out.read_text())["runs"]
    assert (run["status"], run["returncode"]) == ("failed", 3)
    assert run["metrics"] == {"throughput": 5.0}
    assert "exit status 3" in run["error"]
    assert "   | last words" in capsys.readouterr().err


def test_timeout_kills_the_whole_process_group(tmp_path):
    spec = write_spec(tmp_path, """
        hang:
          cmd: python -c "import os, time; open('pid', 'w').write(str(os.getpid())); time.sleep(60)"; echo after
          timeout: 0.5
    """)
    out = tmp_path / "results.json"
    start = time.monotonic()
    assert run_benchmarks(spec, None, out) == 1
    assert time.monotonic() - start < 10
    (run,) = json.loads(out.read_text())["runs"]
    assert (run["status"], run["returncode"]) == ("timeout", None)
    # The python under /bin/sh is gone too (at most a zombie awaiting its new parent).
    pid = int((tmp_path / "pid").read_text())
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"benchmark process {pid} survived the timeout")


def test_unknown_entry_name_suggests_the_close_one(tmp_path, capsys):
    spec = write_spec(tmp_path, """
        train_throughput: {cmd: "true"}
        squad_f1: {cmd: "true"}
    """)
    with pytest.raises(ValueError, match=r"no benchmark named 'train_thruput'; "
                                         r"did you mean 'train_throughput'\?"):
        run_benchmarks(spec, ["train_thruput"], tmp_path / "r.json")
    assert main(["benchmark", "--spec", str(spec), "--benchmark", "squad"]) == 2
    assert "available: train_throughput, squad_f1" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("body, message", [
    ("cmd: 'true'\n  metric: {}", r"'e': unknown key 'metric'; did you mean 'metrics'\?"),
    ("cmd: 'true'\n  metrics: {t: {regex: 'x', reduce: final}}", r"metric 't': unknown key 'reduce'"),
    ("cmd: 'true'\n  metrics: {t: {regex: 'x', reduction: median}}", r"reduction 'median' is not"),
    ("cmd: 'true'\n  metrics: {t: '(unclosed'}", r"metric 't': bad regex"),
    ("parameters: {a: 1}", r"'e': needs a 'cmd'"),
    ("cmd: echo {b}\n  parameters: {a: 1}", r"placeholder \{b\} is not a parameter"),
    ("cmd: echo {a}\n  parameters: {a: 1, b: '2,3'}", r"parameter\(s\) b never used"),
    ("cmd: echo {a}\n  parameters: {a: '1,,2'}", r"parameter 'a': empty value"),
    ("cmd: 'true'\n  timeout: -1", r"timeout must be a positive number"),
])
def test_spec_errors_name_the_entry_and_the_problem(tmp_path, body, message):
    spec = write_spec(tmp_path, f"e:\n  {body}\n")
    with pytest.raises(ValueError, match=message) as err:
        load_spec(spec)
    assert str(spec) in str(err.value)


def test_defaults_section_is_validated_and_shared(tmp_path):
    spec = write_spec(tmp_path, """
        defaults: {timout: 5}
        e: {cmd: "true"}
    """)
    with pytest.raises(ValueError, match=r"defaults: unknown key 'timout'; did you mean 'timeout'"):
        load_spec(spec)
    spec = write_spec(tmp_path, """
        defaults: {timeout: 5, env: {A: shared, B: shared}}
        e: {cmd: "true", env: {B: own}}
        f: {cmd: "true", timeout: 9}
    """)
    entries = load_spec(spec)
    assert (entries["e"].timeout, entries["e"].env) == (5.0, {"A": "shared", "B": "own"})
    assert (entries["f"].timeout, entries["f"].env) == (9.0, {"A": "shared", "B": "shared"})


def test_cli_end_to_end_writes_table_and_json(tmp_path, capsys):
    spec = write_spec(tmp_path, """
        defaults:
          env: {BENCH_TAG: from-defaults}
        echo_env:
          description: checks cwd, PATH's python and env placeholders
          cmd: >-
            python -c "import os, sys; print('cwd', os.getcwd()); print('exe', sys.executable);
            print('tag', os.environ['BENCH_TAG'], os.environ['BENCH_SEQ']);
            print('throughput: %d samples/sec' % ({seq} * {batch}))"
          parameters:
            seq: 128,512
            batch: [2]
          env: {BENCH_SEQ: 'seq{seq}'}
          metrics:
            throughput: {regex: 'throughput: *([0-9,.]+) samples/sec', reduction: final}
    """)
    out = tmp_path / "out" / "results.json"
    assert main(["benchmark", "--spec", str(spec), "--output", str(out)]) == 0
    captured = capsys.readouterr()
    # The command's own output streams to stderr; the table alone goes to stdout.
    assert f"cwd {tmp_path}" in captured.err
    assert f"exe {Path(sys.executable).parent / 'python'}" in captured.err
    assert "tag from-defaults seq512" in captured.err
    table = captured.out.splitlines()
    assert table[0].split() == ["entry", "parameters", "throughput", "wall_s", "status"]
    assert table[2].split()[:4] == ["echo_env", "seq=128", "batch=2", "256.0"]
    assert table[3].split()[:4] == ["echo_env", "seq=512", "batch=2", "1,024.0"]
    assert "2 of 2 runs passed" in captured.out

    result = json.loads(out.read_text())
    assert result["machine"]["cpu_count"] == os.cpu_count()
    assert {"platform", "cpu_model", "torch", "python"} <= set(result["machine"])
    assert result["cwd"] == str(tmp_path)
    first, second = result["runs"]
    assert first["params"] == {"seq": "128", "batch": "2"}
    assert "(128 * 2)" in first["command"]
    assert (first["metrics"], second["metrics"]) == ({"throughput": 256.0}, {"throughput": 1024.0})
    assert all(r["status"] == "ok" and r["returncode"] == 0 and r["error"] is None
               and 0 < r["wall_s"] < 30 and r["started"] for r in result["runs"])


def test_shipped_spec_is_valid_and_its_selftest_passes(tmp_path, monkeypatch):
    spec = REPO / "benchmarks" / "benchmarks.yml"
    entries = load_spec(spec)
    assert {"runner_selftest", "tokenize_sample"} <= set(entries)
    monkeypatch.chdir(tmp_path)  # commands must not depend on the caller's cwd
    out = tmp_path / "selftest.json"
    assert run_benchmarks(spec, ["runner_selftest"], out) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["metrics"] for r in runs] == [
        {"throughput": 2000.0, "last_throughput": 3000.0},
        {"throughput": 4000.0, "last_throughput": 6000.0}]
