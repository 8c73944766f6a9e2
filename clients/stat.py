"""`shmheap stat`: what the daemon holds, for people (tables) and scripts (`--json`).

The JSON schema (version 1, in "schema"; fields are added, never renamed or removed):

    schema      1
    daemon      {pid, segment}
    totals      {virtual, reserved, committed, resident, commit_limit, process_commit_limit}:
                bytes; `resident` is what tmpfs holds of the segment (its header page
                included), `committed` what the daemon counts
    processes   [{pid, command, connections, reserved, committed, private_reserved,
                  private_committed, heap_reserved, heap_committed, heaps, global_objects,
                  since}]: each connected process; bytes of its own regions (`reserved` and
                  `committed` all of them, then its private regions and its heaps' apart),
                  the global objects it owns, when it first connected (Unix time)
    heaps       [{handle, name, owner, reserved, committed, blocks, free, largest_free,
                  fragmentation, reported}]: every private heap (the owner's process heap
                  included). What lies inside a heap only its process knows: it reports live
                  blocks, committed free bytes and the largest free range about once a
                  second while the heap changes; `reported` is that report's age in seconds
                  (these five are null until the first report, and stay null for a
                  HEAP_NO_SERIALIZE heap, which no other thread may read). fragmentation =
                  1 - largest free range / free bytes (0: one free range)
    global      {objects, shared, bytes, reserved, committed, free, largest_free,
                 fragmentation}: the global heap, as of now; `bytes` what its live objects
                 hold, `shared` those no process owns
    sections    [{handle, name, size, file, holders, views}]: `file` true for a file-backed
                one (its pages are the file's, never the segment's)
    clipboard   {sequence, owner, owner_pid, open_window, opener, formats: [[format, name,
                 size, synthesized], ...]}

`--watch SECONDS` redraws the tables in place until interrupted.
"""

import argparse
import json
import sys
import time

import shmheap

from .cli import SOCKET_HELP, positive


def _bytes(n):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _pair(committed, reserved):
    return f"{_bytes(committed)}/{_bytes(reserved)}"


def render(stat):
    """The tables, as lines."""
    totals = stat["totals"]
    lines = [f"shmheapd pid {stat['daemon']['pid']}, segment {stat['daemon']['segment']}",
             f"virtual {_bytes(totals['virtual'])}, reserved {_bytes(totals['reserved'])}, committed"
             f" {_bytes(totals['committed'])} of {_bytes(totals['commit_limit'])}, resident in tmpfs"
             f" {_bytes(totals['resident'])}", "",
             f"{'pid':>8} {'command':<16} {'conns':>5} {'private memory':>21} {'memory in heaps':>21}"
             f" {'heaps':>5} {'globals':>7}",
             f"{'':>8} {'':<16} {'':>5} {'committed/reserved':>21} {'committed/reserved':>21}"]
    for p in stat["processes"]:
        lines.append(f"{p['pid']:>8} {p['command'][:16]:<16} {p['connections']:>5}"
                     f" {_pair(p['private_committed'], p['private_reserved']):>21}"
                     f" {_pair(p['heap_committed'], p['heap_reserved']):>21} {p['heaps']:>5} {p['global_objects']:>7}")
    lines += ["", f"{'heap':>14} {'name':<20} {'owner':>8} {'committed':>10} {'reserved':>10} {'blocks':>9}"
                  f" {'free':>10} {'largest':>10} {'frag':>5} {'as of':>6}"]
    for h in stat["heaps"]:
        inside = ("-", "-", "-", "-", "-") if h["reported"] is None else (
            f"{h['blocks']:,}", _bytes(h["free"]), _bytes(h["largest_free"]), f"{h['fragmentation']:.2f}",
            f"{h['reported']:.0f}s")
        lines.append(f"{h['handle']:#14x} {h['name'][:20]:<20} {h['owner']:>8} {_bytes(h['committed']):>10}"
                     f" {_bytes(h['reserved']):>10} {inside[0]:>9} {inside[1]:>10} {inside[2]:>10} {inside[3]:>5}"
                     f" {inside[4]:>6}")
    g = stat["global"]
    lines += ["", f"global memory: {g['objects']:,} objects ({g['shared']:,} shared) holding {_bytes(g['bytes'])};"
                  f" committed {_bytes(g['committed'])} of {_bytes(g['reserved'])} reserved;"
                  f" free {_bytes(g['free'])}, largest range {_bytes(g['largest_free'])},"
                  f" fragmentation {g['fragmentation']:.2f}"]
    lines.append(f"sections: {len(stat['sections'])}")
    for section in stat["sections"]:
        lines.append(f"  {str(section['name']):<24} {_bytes(section['size']):>11}  {section['holders']} holders,"
                     f" {section['views']} views" + (", a file" if section["file"] else ""))
    clip = stat["clipboard"]
    lines.append(f"clipboard: sequence {clip['sequence']}, {len(clip['formats'])} formats"
                 + (f", open by pid {clip['opener']}" if clip["opener"] else ""))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="shmheap stat", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="the schema above, for scripts")
    parser.add_argument("--watch", type=positive(float), metavar="SECONDS", help="refresh in place")
    parser.add_argument("--socket", help=SOCKET_HELP)
    args = parser.parse_args(argv)
    try:
        with shmheap.connect(args.socket, autostart=False) as client:
            while True:
                stat = client.stat()
                if args.json:
                    print(json.dumps(stat, indent=2), flush=True)
                else:
                    if args.watch and sys.stdout.isatty():
                        sys.stdout.write("\033[H\033[2J")  # home, clear: redraw in place
                    print("\n".join(render(stat)), flush=True)
                if not args.watch:
                    return 0
                time.sleep(args.watch)
    except shmheap.ShmheapError as exc:
        print(f"shmheap stat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
