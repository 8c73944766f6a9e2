"""`shmheap stat`: what the daemon holds, for people (tables) and scripts (`--json`).

The JSON schema (version 1, in "schema"; fields are added, never renamed or removed):

    schema      1
    daemon      {pid, segment}
    totals      {virtual, reserved, committed, resident, commit_limit, process_commit_limit}:
                bytes; `resident` is what tmpfs holds of the segment (its header page
                included), `committed` what the daemon counts
    processes   [{pid, command, connections, reserved, committed, heaps, global_objects,
                  since}]: each connected process; bytes of its own regions (private and
                  heaps), the global objects it owns, when it first connected (Unix time)
    heaps       [{handle, name, owner, reserved, committed}]: every private heap (the owner's
                process heap included)
    global      {objects, shared, bytes, reserved, committed, largest_free}: the global heap;
                `bytes` what its live objects hold, `shared` those no process owns
    sections    [{handle, name, size, holders, views}]
    clipboard   {sequence, owner, owner_pid, open_window, opener, formats: [[format, name,
                 size, synthesized], ...]}

`--watch SECONDS` redraws the tables in place until interrupted.
"""

import argparse
import json
import sys
import time

import shmheap

from .cli import positive


def _bytes(n):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def render(stat):
    """The tables, as lines."""
    totals = stat["totals"]
    lines = [f"shmheapd pid {stat['daemon']['pid']}, segment {stat['daemon']['segment']}",
             f"virtual {_bytes(totals['virtual'])}, reserved {_bytes(totals['reserved'])}, committed"
             f" {_bytes(totals['committed'])} of {_bytes(totals['commit_limit'])}, resident in tmpfs"
             f" {_bytes(totals['resident'])}", "",
             f"{'pid':>8} {'command':<16} {'conns':>5} {'reserved':>11} {'committed':>11} {'heaps':>5} {'globals':>7}"]
    for p in stat["processes"]:
        lines.append(f"{p['pid']:>8} {p['command'][:16]:<16} {p['connections']:>5} {_bytes(p['reserved']):>11}"
                     f" {_bytes(p['committed']):>11} {p['heaps']:>5} {p['global_objects']:>7}")
    lines += ["", f"{'heap':>16} {'name':<24} {'owner':>8} {'reserved':>11} {'committed':>11}"]
    for h in stat["heaps"]:
        lines.append(f"{h['handle']:#16x} {h['name'][:24]:<24} {h['owner']:>8} {_bytes(h['reserved']):>11}"
                     f" {_bytes(h['committed']):>11}")
    g = stat["global"]
    lines += ["", f"global memory: {g['objects']:,} objects ({g['shared']:,} shared) holding {_bytes(g['bytes'])};"
                  f" committed {_bytes(g['committed'])} of {_bytes(g['reserved'])} reserved;"
                  f" largest free range {_bytes(g['largest_free'])}"]
    lines.append(f"sections: {len(stat['sections'])}")
    for section in stat["sections"]:
        lines.append(f"  {str(section['name']):<24} {_bytes(section['size']):>11}  {section['holders']} holders,"
                     f" {section['views']} views")
    clip = stat["clipboard"]
    lines.append(f"clipboard: sequence {clip['sequence']}, {len(clip['formats'])} formats"
                 + (f", open by pid {clip['opener']}" if clip["opener"] else ""))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="shmheap stat", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="the schema above, for scripts")
    parser.add_argument("--watch", type=positive(float), metavar="SECONDS", help="refresh in place")
    parser.add_argument("--socket", help="the daemon's socket (default: SHMHEAP_SOCKET, or the user's own)")
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
