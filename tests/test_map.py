"""`shmheap map`: the segment page by page, as text and as SVG, with counts that agree with
what the daemon says of its regions and commit."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

from shmheap.constants import MEM_COMMIT, MEM_RESERVE, PAGE_READWRITE

MiB = 2**20


def _map(socket_path, *args):
    return subprocess.run([sys.executable, "-m", "shmheap_clients.cli", "map", "--socket", socket_path, *args],
                          capture_output=True, text=True, timeout=60)


def test_the_svg_map_counts_every_page_as_the_daemon_does(daemon, client, tmp_path):
    client.create_heap("mapped", initial=MiB)
    region = client.virtual_alloc(0, 4 * MiB, MEM_RESERVE, PAGE_READWRITE)
    client.virtual_alloc(region, MiB, MEM_COMMIT, PAGE_READWRITE)
    client.section_create(PAGE_READWRITE, MiB, "mapped section")
    handles = [client.global_alloc(0, 100_000) for _ in range(5)]
    svg = tmp_path / "map.svg"
    proc = _map(daemon.socket, "--output", str(svg))
    assert proc.returncode == 0, proc.stderr
    assert "\033[" not in proc.stdout and "one cell =" in proc.stdout  # plain when piped
    root = ElementTree.parse(svg).getroot()  # well-formed SVG
    assert root.tag.endswith("svg")
    counts = {e.get("data-symbol"): int(e.get("data-pages")) for e in root.iter() if e.get("data-pages")}
    page = client.info["page_size"]
    expected = {}
    for base, size, owner, kind, committed in client.status()["regions"]:
        letter = {"private": "P", "heap": "H", "global": "G", "section": "S"}[kind]
        expected[letter] = expected.get(letter, 0) + committed
        expected[letter.lower()] = expected.get(letter.lower(), 0) + size // page - committed
    # The map command's own connection added its process heap and its CRT heap: two heap
    # regions more.
    own_heap = counts["H"] + counts.get("h", 0) - expected["H"] - expected.get("h", 0)
    assert own_heap in (0, 48)  # 128 + 64 KiB, their reservations
    for symbol in ("P", "p", "G", "g", "S"):
        assert counts.get(symbol, 0) == expected.get(symbol, 0), symbol
    used = sum(n for s, n in counts.items() if s != ".")
    total = client.memory_status()["total_virtual"] // page
    assert counts["."] + used == total
    assert counts["P"] == MiB // page and counts["p"] == 3 * MiB // page
    cells = [e for e in root.iter() if e.tag.endswith("rect")]
    assert cells and all(e.get("data-symbol") in "PpHhGgSs." for e in cells)
    for handle in handles:
        client.global_free(handle)


def test_map_without_a_daemon_is_one_line(short_dir):
    proc = _map(os.path.join(short_dir, "none.sock"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "shmheap map:" in proc.stderr
