"""`shmheap bench --quick` runs end to end (its own daemon, its own echo server, its spawn peers
and pool worker) and reports a positive figure in every cell. No timing is asserted: the
machine decides those."""

import json
import subprocess
import sys

HEAP_ROWS = [f"heap_{form}_{size}" for size in (16, 64, 1024, 4096, 65536, 262144)
             for form in ("create", "process", "block", "sized")]
ROW_KEYS = ["echo", "pipeline", "idle500", "alloc64k", "write4", "view4", *HEAP_ROWS,
            "share4k", "clip1k_pipe", "clip1k_shm", "clip64m_pipe", "clip64m_shm", "pool_oneshot_pickle", "pool_oneshot_shm", "pool_steady_pickle",
            "pool_steady_shm", "share_many", "file_read", "file_mmap", "malloc64", "concurrent", "metadata"]


def test_bench_quick_writes_positive_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "shmheap_clients.bench", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The SharedMemory baselines attach in spawn children; nothing may leak or double-unregister
    # (the resource tracker would print a warning or a KeyError traceback).
    assert "Traceback" not in proc.stderr and "leaked" not in proc.stderr, proc.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [row["key"] for row in rows] == ROW_KEYS
    assert report["settings"]["pool_mib"] == 8  # quick mode's array size, printed in the table
    assert "8 MiB to pool" in proc.stdout
    metadata = rows.pop()
    assert metadata["shmheap_bytes"] > 0 and metadata["baseline_bytes"] > 0
    concurrent = rows.pop()
    assert concurrent["ops_per_second"] > 0 and concurrent["procs"] == 8
    for row in rows:
        if row["key"].startswith("heap_"):
            assert row["requests"] >= 0 and "daemon requests" in proc.stdout
    for row in rows:
        for field in ("shmheap_us", "shmheap_min_us", "baseline_us", "baseline_min_us", "ratio"):
            assert row[field] > 0, (row["key"], field, row[field])
