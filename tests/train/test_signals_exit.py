"""How `k2 worker train` ends, as the operator sees it: exit code and termination message.

SIGTERM (preemption) checkpoints and exits ExitCodes.PREEMPTED with "preempted at step N, checkpoint X"; a crash
exits non-zero (not PREEMPTED) with the exception in the message; only reaching spec.steps exits 0. Real processes.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import yaml

from k2_api.contract import Env, ExitCodes, Files
from k2_workers.train.checkpoint import complete_checkpoints
from k2_workers.train.termination import crash_message, truncate, write_termination_message

from .launch import MANIFEST, WORKER, base_env, step_lines, wait_for_step


def _env(log: Path) -> dict[str, str]:
    return base_env() | {Env.TERMINATION_LOG: str(log)}


def _manifest(tmp_path: Path, **spec: object) -> Path:
    body = yaml.safe_load(MANIFEST.read_text())
    body["spec"].update(spec)
    path = tmp_path / "training.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_sigterm_checkpoints_and_exits_preempted_with_a_message(tmp_path: Path) -> None:
    log, ckpt = tmp_path / "termination-log", tmp_path / "ckpt"
    args = ["--config", str(MANIFEST), "--steps", "100000", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "0"]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([*WORKER, *args], env=_env(log), stdout=out, stderr=err, text=True)
        try:
            wait_for_step(tmp_path / "out", 2, [proc])
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        finally:
            proc.kill()
    assert code == ExitCodes.PREEMPTED != 0, (tmp_path / "err").read_text()[-3000:]
    last = step_lines((tmp_path / "out").read_text())[-1]["step"]
    [(step, path)] = complete_checkpoints(ckpt)
    assert step == last
    assert log.read_text() == f"preempted at step {last}, checkpoint {path}"


def test_reaching_spec_steps_exits_0_and_writes_no_message(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    args = ["--config", str(MANIFEST), "--steps", "2", "--checkpoint-dir", str(tmp_path / "ckpt")]
    result = subprocess.run([*WORKER, *args], env=_env(log), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == ExitCodes.SUCCEEDED, result.stderr[-3000:]
    assert [r["step"] for r in step_lines(result.stdout)] == [1, 2]
    assert not log.exists()


def test_a_bad_corpus_path_crashes_with_a_message_naming_it(tmp_path: Path) -> None:
    log, missing = tmp_path / "termination-log", tmp_path / "no-such-corpus"
    config = _manifest(tmp_path, data={"uri": str(missing), "seqLen": 64, "batchSize": 4})
    result = subprocess.run(
        [*WORKER, "--config", str(config)], env=_env(log), capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode not in (ExitCodes.SUCCEEDED, ExitCodes.PREEMPTED)
    assert result.returncode == ExitCodes.CRASHED, result.stderr[-3000:]
    message = log.read_text()
    assert message.startswith("rank 0 failed: ") and str(missing) in message, message


def test_an_invalid_manifest_exits_2_with_the_reason(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    config = _manifest(tmp_path, steps=0)
    result = subprocess.run(
        [*WORKER, "--config", str(config)], env=_env(log), capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == ExitCodes.INVALID_CONFIG
    assert log.read_text().startswith("invalid configuration: ") and "steps" in log.read_text()


def test_messages_are_truncated_to_the_kubelet_limit_on_a_character_boundary(tmp_path: Path) -> None:
    long = "é" * Files.TERMINATION_MESSAGE_MAX_BYTES  # 2 bytes each
    cut = truncate(long)
    assert len(cut.encode()) == Files.TERMINATION_MESSAGE_MAX_BYTES and set(cut) == {"é"}
    assert truncate("short") == "short"
    log = tmp_path / "log"
    write_termination_message(long, {Env.TERMINATION_LOG: str(log)})
    assert log.read_bytes() == cut.encode()
    write_termination_message("x", {})  # no log configured: nothing written, no error
    write_termination_message("x", {Env.TERMINATION_LOG: str(tmp_path / "missing-dir" / "log")})  # logged, no raise


def test_crash_message_names_the_type_the_message_and_the_cause() -> None:
    try:
        try:
            raise FileNotFoundError(2, "No such file", "/data/x")
        except OSError as inner:
            raise RuntimeError("loading the corpus failed") from inner
    except RuntimeError as error:
        text = crash_message(error)
    assert text == (
        "RuntimeError: loading the corpus failed (caused by FileNotFoundError: [Errno 2] No such file: '/data/x')"
    )
