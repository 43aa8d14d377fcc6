"""The ``asprof`` command: convert, summary, top; one-line errors and exit codes."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, List, Tuple

import pytest

from asprof import cli

import jfr_builder as B

ROOT = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def jfr(tmp_path: Path) -> Path:
    s = B.Simple()
    s.thread(1, "main")
    s.thread(2, "worker")
    s.exec_sample(1000, 1, ["main", "compute"])
    s.exec_sample(1000 + 2 * 10**9, 2, ["main", "io"])
    s.wall_sample(1001, 1, ["main", "sleep"], samples=4)
    s.malloc(1002, 1, ["main", "alloc"], 0x10, 64)
    s.malloc(1003, 1, ["main", "alloc"], 0x20, 32)
    s.free(1004, 1, 0x10)
    p = tmp_path / "rec.jfr"
    p.write_bytes(s.build(duration_nanos=3 * 10**9))
    return p


def test_convert_formats_by_extension(capsys: pytest.CaptureFixture[str], jfr: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.collapsed"
    assert run(capsys, "convert", str(jfr), "-o", str(out))[0] == 0
    assert out.read_text() == "main;compute 1\nmain;io 1\n"
    html = tmp_path / "o.html"
    assert run(capsys, "convert", str(jfr), "-o", str(html), "--title", "Mine")[0] == 0
    assert html.read_text().startswith("<!DOCTYPE html>") and "<title>Mine</title>" in html.read_text()
    pb = tmp_path / "o.pb.gz"
    assert run(capsys, "convert", str(jfr), "-o", str(pb))[0] == 0
    assert gzip.decompress(pb.read_bytes())
    txt = tmp_path / "o.data"
    assert run(capsys, "convert", str(jfr), "-o", str(txt), "--format", "collapsed")[0] == 0
    assert txt.read_text().startswith("main;")


def test_convert_kinds_and_filters(capsys: pytest.CaptureFixture[str], jfr: Path) -> None:
    def collapsed(*args: str) -> str:
        code, out, err = run(capsys, "convert", str(jfr), "-o", "-", "--format", "collapsed", *args)
        assert code == 0, err
        return out

    assert collapsed("--wall") == "main;sleep 4\n"
    assert collapsed("--nativemem") == "main;alloc 96\n"
    assert collapsed("--nativemem", "--count") == "main;alloc 2\n"
    assert collapsed("--leaks", "--tail", "0") == "main;alloc 32\n"
    assert collapsed("--cpu", "--threads") == "[main tid=1];main;compute 1\n[worker tid=2];main;io 1\n"
    assert collapsed("--thread", "worker") == "main;io 1\n"
    assert collapsed("--thread", "1") == "main;compute 1\n"
    assert collapsed("--from", "1s") == "main;io 1\n"
    assert collapsed("--to", "1000") == "main;compute 1\n"  # bare numbers are ms, as in jfrconv
    assert collapsed("--from=-1.5s") == "main;io 1\n"  # negative: counted from the end
    assert collapsed("-I", "io") == "main;io 1\n"
    assert collapsed("--exclude", "io", "--exclude", "nothing") == "main;compute 1\n"


def test_default_output_name(capsys: pytest.CaptureFixture[str], jfr: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "convert", str(jfr), "--format", "pprof")[0] == 0
    assert (tmp_path / "rec.pb.gz").exists()
    assert run(capsys, "convert", str(jfr))[0] == 0
    assert (tmp_path / "rec.html").exists()


def test_multiple_inputs_zip_and_directory(capsys: pytest.CaptureFixture[str], jfr: Path, tmp_path: Path) -> None:
    z = tmp_path / "r.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("async_profiler_dump_0.jfr", jfr.read_bytes())
        zf.writestr("metadata.json", json.dumps({"start": 1, "end": 2, "reporting_interval": 30000}))
    code, out, _ = run(capsys, "convert", str(jfr), str(z), "-o", "-", "--format", "collapsed")
    assert code == 0 and out == "main;compute 2\nmain;io 2\n"
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jfr").write_bytes(jfr.read_bytes())
    (d / "b.zip").write_bytes(z.read_bytes())
    code, out, _ = run(capsys, "convert", str(d), "-o", "-", "-f", "collapsed")
    assert code == 0 and out == "main;compute 2\nmain;io 2\n"
    code, out, _ = run(capsys, "summary", str(z))
    assert code == 0 and "reporting_interval" in out


def test_summary(capsys: pytest.CaptureFixture[str], jfr: Path) -> None:
    code, out, err = run(capsys, "summary", str(jfr))
    assert code == 0, err
    assert "Chunks: 1" in out and "Threads: 2 (main, worker)" in out
    assert "jdk.ExecutionSample" in out and "profiler.Free" in out
    code, out, _ = run(capsys, "summary", "--json", str(jfr))
    s = json.loads(out)
    assert s["events"]["jdk.ExecutionSample"]["count"] == 2 and s["chunks"] == 1
    assert s["duration_seconds"] == 3.0


def test_top(capsys: pytest.CaptureFixture[str], jfr: Path) -> None:
    code, out, _ = run(capsys, "top", str(jfr), "-n", "1")
    assert code == 0
    lines = out.splitlines()
    assert "cpu profile" in lines[0] and "self%" in lines[1]
    assert lines[2].split()[-1] in ("compute", "io") and len(lines) == 4
    code, out, _ = run(capsys, "top", str(jfr), "--nativemem", "--by", "total")
    assert code == 0 and "96 B" in out and "main" in out


@pytest.mark.parametrize("argv, code, message", [
    (["convert", "missing.jfr"], 1, "missing.jfr: no such file or directory"),
    (["convert"], 2, "the following arguments are required: IN"),
    (["convert", "x.jfr", "--format", "svg"], 2, "invalid choice: 'svg'"),
    (["convert", "x.jfr", "--cpu", "--wall"], 2, "not allowed with argument"),
    (["convert", "x.jfr", "--from", "yesterday"], 2, "invalid time 'yesterday'"),
    (["top", "x.jfr", "--tail", "2"], 2, "ratio must be between 0 and 1"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str], argv: List[str], code: int,
                                   message: str) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == code
    assert err.count("\n") == 1 and err.startswith("asprof: error: ") and message in err
    assert "Traceback" not in err


def test_malformed_input_is_one_line(capsys: pytest.CaptureFixture[str], jfr: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jfr"
    bad.write_bytes(jfr.read_bytes()[:500])
    rc, _out, err = run(capsys, "convert", str(bad), "-o", str(tmp_path / "x.html"))
    assert rc == 1
    assert err == f"asprof: error: {bad}: offset 0: incomplete chunk: header says {jfr.stat().st_size} bytes, " \
                  "500 available (truncated file, or a recording that is still running)\n"
    rc, _out, err = run(capsys, "convert", str(jfr), "-I", "(", "-o", str(tmp_path / "y.html"))
    assert rc == 1 and "invalid regular expression" in err and err.count("\n") == 1
    rc, _out, err = run(capsys, "convert", str(jfr), "-o", str(tmp_path / "no" / "dir" / "x.html"))
    assert rc == 1 and "No such file or directory" in err and err.count("\n") == 1


def test_no_samples_warns(capsys: pytest.CaptureFixture[str], jfr: Path, tmp_path: Path) -> None:
    rc, _out, err = run(capsys, "convert", str(jfr), "-I", "nothing", "-o", str(tmp_path / "e.html"))
    assert rc == 0 and "no cpu samples matched" in err


def test_python_dash_m_and_help() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "asprof", "--help"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0
    for cmd in ("convert", "summary", "top"):
        assert cmd in r.stdout
    r = subprocess.run([sys.executable, "-m", "asprof", "convert", "nope.jfr"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 1 and r.stderr == "asprof: error: nope.jfr: no such file or directory\n"


def test_subcommands_register_from_a_list() -> None:
    assert "asprof.cli.convert" in cli.SUBCOMMANDS
    parser = cli.build_parser()
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert {"convert", "summary", "top"} <= set(actions[0].choices)


def test_progress_indicator_only_on_a_terminal() -> None:
    import io

    from asprof.cli.common import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    p = Progress(tty, min_bytes=0)
    p.reading(50, 100)
    p.reading(100, 100)
    p.done()
    assert "reading" in tty.getvalue() and "%" in tty.getvalue() and tty.getvalue().endswith("\r\x1b[K")
    plain = io.StringIO()
    p = Progress(plain, min_bytes=0)
    p.reading(50, 100)
    p.done()
    assert plain.getvalue() == ""


def test_convert_real_recording_all_formats(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           recording: Callable[[str], Path]) -> None:
    source = recording("nativemem")
    for kind in ("--cpu", "--wall", "--nativemem", "--leaks"):
        for fmt in ("html", "collapsed", "pprof"):
            out = tmp_path / f"out.{fmt}"
            code, _o, err = run(capsys, "convert", str(source), "-o", str(out), "-f", fmt, kind)
            assert code == 0, err
            assert out.stat().st_size > 0  # the recording has leaks too: buffers it never freed
