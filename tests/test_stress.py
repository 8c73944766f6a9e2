"""`shmheap stress` end to end: workers killed at random, every byte checked, nothing leaked;
the same seed gives the same mix; a daemon that dies mid-run stops it with one line."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import wait_until

KEYS = {"ops", "ops_per_second", "failures", "killed", "leaked_bytes", "latency"}


def _stress(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "shmheap_clients.stress", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_a_chaos_run_loses_no_byte_and_leaks_nothing(tmp_path):
    report_path = tmp_path / "stress.json"
    proc = _stress("--procs", "6", "--seconds", "8", "--chaos", "1", "--json", str(report_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    assert KEYS <= set(report)
    assert report["failures"] == 0 and report["leaked_bytes"] == 0 and report["check"] == "passed"
    assert report["killed"] >= 1 and report["ops"] > 100
    for row in report["latency"].values():
        assert 0 < row["p50_us"] <= row["p99_us"] <= row["max_us"]
    assert "leaked bytes: 0" in proc.stdout and "Traceback" not in proc.stderr


def _counts(report):
    return {kind: row["count"] for kind, row in report["latency"].items() if not kind.startswith("clip")}


def test_the_same_seed_gives_the_same_mix(tmp_path):
    reports = []
    for seed in (7, 7, 8):
        path = tmp_path / f"{len(reports)}.json"
        proc = _stress("--procs", "2", "--ops", "300", "--seed", str(seed), "--mix", "heap,local,global,share",
                       "--json", str(path))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        reports.append(json.loads(path.read_text()))
    assert reports[0]["ops"] == reports[1]["ops"] == 300
    assert _counts(reports[0]) == _counts(reports[1])
    assert _counts(reports[0]) != _counts(reports[2])


def test_a_daemon_that_dies_mid_run_stops_it_with_one_line(daemon):
    proc = subprocess.Popen([sys.executable, "-m", "shmheap_clients.stress", "--procs", "3", "--seconds", "60",
                             "--socket", daemon.socket], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(os.listdir(f"/proc/{daemon.proc.pid}/fd")) > 12, timeout=30,
                   what="the workers to connect")
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(10)
        started = time.monotonic()
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 15
    finally:
        proc.kill()
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "daemon" in lines[0], err
    daemon.start()  # the fixture's teardown stops it cleanly


def test_bad_arguments_are_one_line_from_the_parser():
    for args in (["--procs", "0"], ["--mix", "nonsense"], ["--seconds", "-1"], ["--chaos", "-1"]):
        proc = _stress(*args, timeout=30)
        assert proc.returncode == 2 and "error" in proc.stderr and "Traceback" not in proc.stderr
