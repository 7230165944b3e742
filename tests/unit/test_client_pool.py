"""The multi-server job pool (client/pool.py, the datagen and eval commands' ``--server``): a failed job moves to
another server, a job error that would fail anywhere is not retried, a dead server is dropped and its job requeued,
jobs left with no server fail saying so. Servers are tiny local HTTP servers answering ``/system_stats`` (what the
pool asks to tell a dead server from a failed job)."""

import collections
import http.server
import threading

import pytest

from comfyui_syncd.client.api import ComfyClient
from comfyui_syncd.client.pool import NO_SERVER_LEFT, JobError, run_jobs, unreachable

pytestmark = pytest.mark.unit


class Stats(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def servers():
    started = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stats) for _ in range(2)]
    for server in started:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in started]
    for server in started:
        server.shutdown()


def test_failed_jobs_move_to_another_server_and_job_errors_are_final(servers):
    calls = collections.Counter()
    done, failed_on = {}, []
    lock = threading.Lock()

    def work(client, job):
        with lock:
            calls[job] += 1
        if job == "flaky" and not failed_on:  # fails once, on whichever server takes it first
            failed_on.append(client.url)
            raise RuntimeError("out of memory")
        if job == "broken":
            raise JobError("the workflow saved no images")
        with lock:
            done[job] = client.url

    jobs = ["a", "flaky", "broken", "b", "c"]
    failed = run_jobs(servers, jobs, work, key=lambda j: j, retries=2)
    assert failed == {"broken": "JobError: the workflow saved no images"} and calls["broken"] == 1
    assert set(done) == {"a", "flaky", "b", "c"}
    assert calls["flaky"] == 2 and done["flaky"] != failed_on[0]  # retried on the other server


def test_a_dead_server_is_dropped_and_its_job_requeued(servers):
    dead = "http://127.0.0.1:1"  # nothing listens: /system_stats fails, so the server is gone
    done = {}

    def work(client, job):
        if client.url == dead:
            raise ConnectionError("connection refused")
        done[job] = client.url

    finished = []
    failed = run_jobs([dead, servers[0]], list(range(6)), work, key=lambda j: j, retries=0,
                      progress=lambda job, error: finished.append((job, error)))
    assert failed == {} and sorted(done) == list(range(6)) and set(done.values()) == {servers[0]}
    assert sorted(finished) == [(j, None) for j in range(6)]


class Refused(RuntimeError):
    pass


def test_final_exception_types_are_not_retried(servers):
    calls = collections.Counter()

    def work(client, job):
        calls[job] += 1
        raise Refused("the server refused the workflow") if job == "refused" else RuntimeError("out of memory")

    failed = run_jobs(servers, ["refused", "oom"], work, key=lambda j: j, retries=3, final=(Refused,))
    assert failed == {"refused": "Refused: the server refused the workflow", "oom": "RuntimeError: out of memory"}
    assert calls == {"refused": 1, "oom": 4}  # the first attempt and 3 retries


def test_jobs_fail_saying_so_when_every_server_is_dead(servers):
    dead = "http://127.0.0.1:1"
    assert unreachable(ComfyClient(dead)) and not unreachable(ComfyClient(servers[0]))

    def work(client, job):
        raise ConnectionError("connection refused")

    assert run_jobs([dead], ["a", "b"], work, key=lambda j: j) == {"a": NO_SERVER_LEFT, "b": NO_SERVER_LEFT}
