"""What `k2 worker train` prints: the progress bar (a pure function and a fake clock), JSON lines with `--json`, and
the choice between them on a real terminal (a pty)."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time

from k2_workers.train.cli import config_from_args, parse_args
from k2_workers.train.progress import (
    JsonLines,
    ProgressBar,
    eta_seconds,
    format_duration,
    render_bar,
    step_output,
)
from tests.train.launch import MANIFEST, base_env


def test_durations_read_as_a_clock() -> None:
    assert format_duration(0) == "00:00"
    assert format_duration(59.2) == "01:00"  # rounded up: a last fraction of a second still shows
    assert format_duration(61) == "01:01"
    assert format_duration(3 * 3600 + 5 * 60 + 7) == "3:05:07"
    assert format_duration(-3) == "00:00"


def test_eta_is_the_rate_since_the_first_printed_step() -> None:
    assert eta_seconds(step=5, steps=40, first_step=5, first_time=10.0, now=10.0) is None
    # 5 steps in 10 s since step 5: 2 s a step, 30 steps left
    assert eta_seconds(step=10, steps=40, first_step=5, first_time=10.0, now=20.0) == 60.0
    assert eta_seconds(step=40, steps=40, first_step=5, first_time=0.0, now=70.0) == 0.0


def test_the_bar_shows_step_of_steps_percent_loss_throughput_elapsed_and_eta() -> None:
    line = render_bar(10, 40, elapsed_s=25.0, eta_s=60.0, loss=2.345678, tokens_per_s=12345.6, width=8)
    assert line == "step 10/40 [##------]  25% loss 2.3457 12,346 tok/s 00:25<01:00"
    assert render_bar(0, 4, 0.0, None, width=4) == "step 0/4 [----]   0% 00:00<--:--"
    assert render_bar(4, 4, 3.0, 0.0, width=4) == "step 4/4 [####] 100% 00:03<00:00"


def test_the_bar_rewrites_one_line_with_a_fake_clock_and_ends_it_at_the_last_step() -> None:
    now = [100.0]
    out = io.StringIO()
    bar = ProgressBar(out, steps=3, clock=lambda: now[0], columns=lambda: 200)
    for step, at in ((1, 101.0), (2, 103.0), (3, 105.0)):
        now[0] = at
        bar.step({"step": step, "loss": 1.0 / step, "tokens_per_s": 1000.0})
    bar.close()  # the line already ended: no second newline
    frames = out.getvalue().split("\r")[1:]
    assert [frame.split(" [")[0] for frame in frames] == ["step 1/3", "step 2/3", "step 3/3"]
    assert frames[0].endswith("00:01<--:--\x1b[K")  # no rate before a second step
    assert frames[1].endswith("00:03<00:02\x1b[K")  # 2 s a step since step 1, one step left
    assert frames[2].endswith("00:05<00:00\x1b[K\n")
    assert out.getvalue().count("\n") == 1


def test_a_stopped_bar_ends_its_line_on_close_and_lines_fit_the_terminal() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, steps=100, clock=lambda: 0.0, columns=lambda: 30)
    bar.step({"step": 7, "loss": 3.0, "tokens_per_s": 10.0})
    assert "\n" not in out.getvalue()
    assert len(out.getvalue().removeprefix("\r").removesuffix("\x1b[K")) == 29
    bar.close()
    assert out.getvalue().endswith("\n")


def test_json_lines_print_each_record() -> None:
    out = io.StringIO()
    lines = step_output(False, out, 10)
    assert isinstance(lines, JsonLines)
    lines.step({"step": 1, "loss": 2.5})
    lines.close()
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [{"step": 1, "loss": 2.5}]
    assert isinstance(step_output(True, io.StringIO(), 10), ProgressBar)


def test_the_bar_is_for_terminals_without_json() -> None:
    argv = ["--config", str(MANIFEST)]
    assert config_from_args(parse_args(argv), stdout_is_tty=True).progress_bar
    assert not config_from_args(parse_args([*argv, "--json"]), stdout_is_tty=True).progress_bar
    assert not config_from_args(parse_args(argv), stdout_is_tty=False).progress_bar


def _run_on_a_terminal(extra: list[str], timeout_s: float = 240) -> str:
    """`k2 worker train` with stdout on a pseudo-terminal (stderr, the logs, on a pipe); what the terminal got."""
    leader, follower = pty.openpty()
    command = [sys.executable, "-m", "k2_workers.train", "--config", str(MANIFEST), "--steps", "3", *extra]
    process = subprocess.Popen(command, stdout=follower, stderr=subprocess.PIPE, env=base_env())
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the follower side closed: the worker exited
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif process.poll() is not None:
            break
    os.close(leader)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    return b"".join(chunks).decode()


def test_on_a_terminal_the_worker_draws_a_bar_and_json_keeps_the_lines() -> None:
    drawn = _run_on_a_terminal([])
    frames = [frame for frame in drawn.split("\r") if frame.strip()]
    assert [frame.split(" [")[0] for frame in frames] == ["step 1/3", "step 2/3", "step 3/3"], drawn
    assert "<" in frames[-1] and "tok/s" in frames[-1] and "loss " in frames[-1]
    assert "{" not in drawn

    lines = [json.loads(line) for line in _run_on_a_terminal(["--json"]).splitlines() if line.strip()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(line["step_s"] > 0 and line["tokens_per_s"] > 0 for line in lines)
