"""`shmheap bench --quick` runs end to end (its own daemon, its own echo server) and reports a
positive figure in every cell. No timing is asserted: the machine decides those."""

import json
import subprocess
import sys


def test_bench_quick_writes_positive_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "shmheap_clients.bench", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["key"] for row in rows] == ["echo", "pipeline", "alloc64k", "heap64", "heap4k", "metadata"]
    metadata = rows.pop()
    assert metadata["shmheap_bytes"] > 0 and metadata["baseline_bytes"] > 0
    for row in rows:
        for field in ("shmheap_us", "shmheap_min_us", "baseline_us", "baseline_min_us", "ratio"):
            assert row[field] > 0, (row["key"], field, row[field])
