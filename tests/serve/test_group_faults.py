"""A serving group under real faults, as real processes on loopback (two gloo ranks where the fault is a group's):
an idle group outlives its collective timeout, a placement that does not fit is refused while the group serves, a
dead rank makes the others exit with ExitCodes.GROUP_BROKEN (a request it was running gets 503: the frontend may run
it on another group), and SIGTERM drains the requests in flight."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from k2_api.contract import ExitCodes
from tests.serve.test_serving_worker import NUM_EXPERTS, NUM_MOE_LAYERS, PROMPT, manifest, reference_completion
from tests.serve.worker_process import request, serve_processes, wait_healthy, wait_until, write_placement
from tests.support.ports import free_port

COLLECTIVE_TIMEOUT_S = 3  # short, so that an idle wait or a dead rank shows within seconds
LONG_TOKENS = 1500  # a request that decodes for seconds even on an idle machine, so a drain can be watched


@contextmanager
def two_rank_group(
    tmp_path: Path, extra_argvs: tuple[list[str], list[str]] = ([], [])
) -> Iterator[tuple[list[str], list[subprocess.Popen[str]], Path]]:
    """A healthy two-rank group (generation 1) with a collective timeout of COLLECTIVE_TIMEOUT_S."""
    ports, master = [free_port(), free_port()], free_port()
    placement = tmp_path / "placement.json"
    write_placement(placement, 1, [[[0, 1, 2, 3], [4, 5, 6, 7]]] * NUM_MOE_LAYERS, NUM_EXPERTS)
    config = manifest(tmp_path, 2, 0)
    common = ["--config", str(config), "--placement", str(placement), "--placement-poll-seconds", "0.2"]
    argvs = [
        [*common, "--port", str(port), "--metrics-port", "-1", *extra]
        for port, extra in zip(ports, extra_argvs, strict=True)
    ]
    group_env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master)}
    envs = [{**group_env, "RANK": str(rank), "K2_COLLECTIVE_TIMEOUT_S": str(COLLECTIVE_TIMEOUT_S)} for rank in (0, 1)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    with serve_processes(argvs, envs) as workers:
        for url, worker in zip(urls, workers, strict=True):
            assert wait_healthy(url, worker)["placementGeneration"] == 1
        yield urls, workers, placement


@pytest.mark.distributed
def test_an_idle_group_outlives_its_collective_timeout_and_refuses_a_placement_that_does_not_fit(
    tmp_path: Path,
) -> None:
    # The follower's own --prefill-chunk-tokens differs: it prefills in rank 0's chunks, which the batch carries
    # (else the ranks would make different numbers of all-to-all calls and hang).
    chunks = (["--prefill-chunk-tokens", "16"], ["--prefill-chunk-tokens", "7"])
    with two_rank_group(tmp_path, chunks) as (urls, workers, placement):
        time.sleep(2.5 * COLLECTIVE_TIMEOUT_S)  # idle: the followers' wait would time out without heartbeats
        assert [w.poll() for w in workers] == [None, None]
        long_prompt = " ".join([PROMPT] * 3)  # 134 tokens: 9 prefill chunks
        status, body = request(urls[0] + "/v1/generate", {"prompt": long_prompt, "max_new_tokens": 6})
        assert status == 200 and body["tokens"] == reference_completion(6, long_prompt), body
        expected = reference_completion(6)

        # 16 experts (each with a replica): valid on its own, but the model has 8 and each rank 4 slots.
        write_placement(placement, 2, [[list(range(8)), list(range(8, 16))]] * NUM_MOE_LAYERS, 16)
        body = wait_until(urls[0] + "/v1/placement", lambda b: b["ignoredFileError"] is not None)
        assert "numExperts is 16, the group has 8; slotsPerRank is 8, the group has 4" in body["ignoredFileError"]
        assert body["generation"] == 1
        status, body = request(urls[0] + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 6})
        assert status == 200 and body["tokens"] == expected and body["placementGeneration"] == 1, body
        for url in urls:
            assert request(url + "/healthz") == (
                200,
                {"status": "ok", "rank": urls.index(url), "placementGeneration": 1},
            )
        assert [w.poll() for w in workers] == [None, None]


@pytest.mark.distributed
def test_a_dead_follower_makes_rank_0_exit_with_group_broken(tmp_path: Path) -> None:
    with two_rank_group(tmp_path) as (_, workers, _):
        workers[1].kill()  # a real death: SIGKILL, no goodbye on the wire
        workers[1].wait(timeout=30)
        assert workers[0].wait(timeout=120) == ExitCodes.GROUP_BROKEN
        assert workers[0].stderr is not None
        assert "the group is broken" in workers[0].stderr.read()


@pytest.mark.distributed
def test_a_request_running_when_its_group_breaks_gets_503_so_another_group_may_run_it(tmp_path: Path) -> None:
    with two_rank_group(tmp_path, (["--max-new-tokens", str(LONG_TOKENS)], [])) as (urls, workers, _):
        answer: list[tuple[int, dict[str, Any]]] = []
        body = {"prompt": PROMPT, "max_new_tokens": LONG_TOKENS}
        client = threading.Thread(target=lambda: answer.append(request(urls[0] + "/v1/generate", body, timeout=120)))
        client.start()
        time.sleep(2.0)  # the long request is decoding
        assert client.is_alive(), "the long request ended before the kill: make LONG_TOKENS larger"
        workers[1].kill()  # SIGKILL mid-decode: the next step's collective fails, nothing has been answered
        client.join(timeout=120)
        assert workers[0].wait(timeout=120) == ExitCodes.GROUP_BROKEN
    ((status, document),) = answer
    assert status == 503 and "the group broke while the request ran" in document["error"], answer


@pytest.mark.distributed
def test_a_dead_rank_0_makes_the_follower_exit_with_group_broken(tmp_path: Path) -> None:
    with two_rank_group(tmp_path) as (_, workers, _):
        workers[0].kill()
        workers[0].wait(timeout=30)
        assert workers[1].wait(timeout=120) == ExitCodes.GROUP_BROKEN


def test_sigterm_answers_the_request_in_flight_and_refuses_new_ones_with_503(tmp_path: Path) -> None:
    port = free_port()
    placement = tmp_path / "placement.json"
    write_placement(placement, 1, [[list(range(NUM_EXPERTS))]] * NUM_MOE_LAYERS, NUM_EXPERTS)
    argv = ["--config", str(manifest(tmp_path, 1, 0)), "--placement", str(placement), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with serve_processes(
        [[*argv, "--metrics-port", "-1", "--max-new-tokens", str(LONG_TOKENS)]], [{"RANK": "0", "WORLD_SIZE": "1"}]
    ) as (worker,):
        wait_healthy(url, worker)
        assert request(url + "/v1/generate", {"prompt": "warm up", "max_new_tokens": 2})[0] == 200
        in_flight: list[tuple[int, dict[str, Any]]] = []
        long = threading.Thread(
            target=lambda: in_flight.append(
                request(url + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": LONG_TOKENS}, timeout=300)
            )
        )
        long.start()
        time.sleep(1.0)  # the long request is decoding
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the rank has begun to drain
        assert long.is_alive(), "the long request ended before the drain could be seen: make LONG_TOKENS larger"
        late = request(url + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 2})
        long.join(timeout=300)
        assert worker.wait(timeout=60) == 0
    assert late[0] == 503 and "stopping" in late[1]["error"], late
    assert in_flight and in_flight[0][0] == 200 and len(in_flight[0][1]["tokens"]) > 0, in_flight
