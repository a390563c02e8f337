"""Logs that read well where they are read (issue 17): without a terminal one timestamped line per
event, never wrapped, at a bounded rate; ``--log-format json`` one JSON object per event."""

from __future__ import annotations

import io
import json
import os
import re
import sys

import pytest
from typer.testing import CliRunner

from neon_cli.commands import app
from neon_cli.commands._common import LineProgress

from cli_helpers import run_guarded

runner = CliRunner()
TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
NUM = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
#: a plain progress record: "TS neon CMD: TASK DONE/TOTAL UNIT (P%)[ ELAPSEDs][ eta Xs][ k=v ...][ done]"
PROGRESS = re.compile(rf"^{TS} neon (?P<cmd>[\w-]+): (?P<task>[\w -]+?) \d+/\d+ img \(\d+%\)( {NUM}s)?( eta {NUM}s)?( \w+={NUM})*( done)?$")
MESSAGE = re.compile(rf"^{TS} neon finetune: finetune: (snapshot theta_s-\d+\.safetensors|resuming from .+)$")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _json_lines(text: str) -> list[dict]:
    return [json.loads(ln) for ln in text.splitlines()]


def test_line_rate_long_task_short_task_restart():
    clock, out = Clock(), io.StringIO()
    log = LineProgress("synth", "json", stream=out, clock=clock)
    for i in range(10001):  # one hour, 10000 updates
        clock.t = 0.36 * i
        log("synth", i, 10000, unit="img")
    events = _json_lines(out.getvalue())
    assert events[0]["event"] == "start" and events[-1]["event"] == "done" and events[-1]["done"] == 10000
    assert 10 <= len(events) <= 3600 / 60 + 12
    times = [e["elapsed_s"] for e in events]
    assert all(b - a >= 5 for a, b in zip(times, times[1:]))  # never a burst
    assert all(b - a <= 60.5 for a, b in zip(times, times[1:]))  # a heartbeat at least every minute
    assert {e["done"] for e in events} >= {1000 * k for k in range(1, 11)}  # every 10 %
    assert all(e["eta_s"] >= 0 for e in events if e["event"] == "progress")

    out.seek(0), out.truncate()
    for i in range(1001):  # two seconds: start and done only
        clock.t = 4000 + 0.002 * i
        log("sample", i, 1000, unit="img")
    for i in range(0, 501, 100):  # the same task again from 0: a new start
        log("sample", i, 500, unit="img", loss=0.5)
    events = _json_lines(out.getvalue())
    assert [e["event"] for e in events] == ["start", "done", "start", "done"]
    assert events[-1]["loss"] == 0.5


def test_plain_records_messages_and_rows_are_one_line_each():
    out = io.StringIO()
    log = LineProgress("tune-w", "plain", stream=out)
    log("tune-w", 1, 9, row={"w": 0.8, "gamma": 2.0, "fid": 0.33094})
    log("finetune", 5, 10, message="first line\nsecond line")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines  # start of each task, the row, the message
    for pattern in (rf"{TS} neon tune-w: tune-w 1/9 \(11%\)", rf"{TS} neon tune-w: tune-w: w=0.8  gamma=2  fid=0.3309",
                    rf"{TS} neon tune-w: finetune 5/10 \(50%\)", rf"{TS} neon tune-w: finetune: first line second line"):
        assert sum(bool(re.fullmatch(pattern, ln)) for ln in lines) == 1, (pattern, lines)


@pytest.mark.slow
def test_a_real_run_piped_writes_whole_records(tmp_path):
    """synth and finetune with stderr to a pipe in a 30-column 'terminal': every line is one whole
    record (timestamp, command, numbers to the end), none blank, none wrapped, a few per task."""
    env = dict(os.environ, COLUMNS="30", OMP_NUM_THREADS="1")
    env.pop("NEON_LOG_FORMAT", None)
    cmds = [["synth", "digits", "--num-images", "96", "--batch", "16", "--shard-size", "32", "-o", "S"],
            ["finetune", "digits", "--data", "S", "--budget", "64", "--batch", "16", "--save-every", "32", "-o", "ft"]]
    for argv in cmds:
        res = run_guarded([sys.executable, "-m", "neon_cli", *argv], f"neon {argv[0]}", cwd=tmp_path, capture_output=True,
                          text=True, env=env)
        assert res.returncode == 0, res.stderr
        lines = res.stderr.splitlines()
        assert lines and lines[0].strip(), repr(res.stderr[:200])
        for ln in lines:
            assert PROGRESS.fullmatch(ln) or MESSAGE.fullmatch(ln), f"not one whole record: {ln!r}\n{res.stderr}"
        progress = [PROGRESS.fullmatch(ln) for ln in lines if PROGRESS.fullmatch(ln)]
        assert progress[0].group("cmd") == argv[0] and lines[-1].endswith(" done") or MESSAGE.fullmatch(lines[-1])
        assert len(lines) <= 12, res.stderr
    assert sum(bool(MESSAGE.fullmatch(ln)) for ln in lines) == 2  # two snapshots announced


def test_json_log_format_progress_and_error(tmp_path):
    res = runner.invoke(app, ["synth", "digits", "--num-images", "32", "--batch", "16", "-o", str(tmp_path / "S"),
                              "--log-format", "json", "--set", "steps=2"])
    assert res.exit_code == 0, res.output
    events = _json_lines(res.stderr)
    assert {e["command"] for e in events} == {"synth"} and events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert all(re.fullmatch(TS, e["time"]) for e in events) and events[-1]["total"] == 32 and events[-1]["unit"] == "img"
    # an error is one JSON object too, also when the format comes from the environment
    res = runner.invoke(app, ["eval", "digits", "--max-metric", "fd=1"], env={"NEON_LOG_FORMAT": "json"})
    assert res.exit_code == 2
    (err,) = _json_lines(res.stderr)
    assert err["event"] == "error" and err["exit_code"] == 2 and "--max-metric fd" in err["message"] and err["command"] == "eval"
    # plain keeps the one-line error contract
    res = runner.invoke(app, ["eval", "digits", "--max-metric", "fd=1", "--log-format", "plain"])
    assert res.exit_code == 2 and res.stderr.startswith("neon eval: error: --max-metric fd") and res.stderr.count("\n") == 1
