"""The `shmheap` command: demo, bench, pool, clip, stress, stat, map, status, check, stop."""

import argparse
import sys
import time

import shmheap

SOCKET_HELP = "the daemon's socket (default: SHMHEAP_SOCKET, or the user's own)"


def positive(kind):
    """An argparse type: a number of `kind` above 0 (the parser's one-line error otherwise)."""
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value
    return check


def _status(args):
    with shmheap.connect(args.socket, autostart=False) as client:
        status = client.status()
        heaps = client.heap_list()
        sections = client.section_list()
        page_size = client.info["page_size"]
    print(f"shmheapd pid {status['daemon_pid']}: {status['committed']:,} bytes committed,"
          f" {status['resident']:,} resident")
    print(f"{'pid':>8} {'connections':>11} {'committed':>14}  since")
    for process in status["processes"]:
        if process["pid"] == client.pid and process["connections"] == 1:
            continue  # this command itself
        since = time.strftime("%H:%M:%S", time.localtime(process["started"]))
        print(f"{process['pid']:>8} {process['connections']:>11} {process['committed']:>14,}  {since}")
    print(f"{'heap':>14} {'name':<24} {'owner':>8} {'reserved':>14} {'committed':>14}  created")
    for heap in sorted(heaps, key=lambda h: h["handle"]):
        created = time.strftime("%H:%M:%S", time.localtime(heap["created"]))
        print(f"{heap['handle']:#14x} {heap['name'][:24]:<24} {heap['owner']:>8}"
              f" {heap['reserved']:>14,} {heap['committed']:>14,}  {created}")
    print(f"global memory: {status['global_objects']:,} live objects; sections: {len(sections)}")
    for section in sections:
        holders = ", ".join(f"pid {pid}" for pid, _ in section["handles"]) or "views only"
        print(f"{section['handle']:>14} {str(section['name'])[:24]:<24} {section['size']:>14,}  {holders}")
    print(f"{'region':>14} {'size':>14} {'owner':>8} {'kind':<8} {'committed':>14}")
    for base, size, owner, kind, pages in status["regions"]:
        print(f"{base:#14x} {size:>14,} {owner:>8} {kind:<8} {pages * page_size:>14,}")
    return 0


def _check(args):
    with shmheap.connect(args.socket, autostart=False) as client:
        for key, value in client.check().items():
            print(f"{key}: {value}")
    print("the daemon's invariants hold")
    return 0


def _stop(args):
    with shmheap.connect(args.socket, autostart=False) as client:
        pid = client.info["daemon_pid"]
        client.shutdown()
    print(f"shmheapd pid {pid} is shutting down")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="shmheap", description="shmheap client tool")
    parser.add_argument("--version", action="version", version=f"shmheap {shmheap.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="show what shmheap does, with real processes")
    commands.add_parser("bench", help="benchmarks against the standard library", add_help=False)
    commands.add_parser("pool", help="a worker pool sharing numpy buffers", add_help=False)
    commands.add_parser("clip", help="the clipboard: copy, paste, list, watch, clear", add_help=False)
    commands.add_parser("stress", help="many processes at once, every byte checked, with chaos", add_help=False)
    commands.add_parser("stat", help="what the daemon holds: totals, processes, heaps, global memory", add_help=False)
    commands.add_parser("map", help="the segment drawn page by page (VMMap-style), as text or SVG", add_help=False)
    for name, text in (("status", "processes and regions of the running daemon"),
                       ("check", "ask the daemon to verify its invariants"),
                       ("stop", "ask the daemon to shut down cleanly (socket and segment removed)")):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--socket", help=SOCKET_HELP)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command == "demo":
        from . import demo
        return demo.main(rest)
    if args.command == "bench":
        from . import bench
        return bench.main(rest)
    if args.command == "pool":
        try:
            from . import pool
        except ImportError as exc:
            print(f"shmheap pool: needs numpy ({exc}): pip install 'shmheap[numpy]'", file=sys.stderr)
            return 1
        return pool.main(rest)
    if args.command == "clip":
        from . import clip
        return clip.main(rest)
    if args.command == "stress":
        from . import stress
        return stress.main(rest)
    if args.command == "stat":
        from . import stat
        return stat.main(rest)
    if args.command == "map":
        from . import map as page_map
        return page_map.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return {"status": _status, "check": _check, "stop": _stop}[args.command](args)
    except shmheap.ShmheapError as exc:  # no daemon, or it refused: one line, not a traceback
        print(f"shmheap {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
