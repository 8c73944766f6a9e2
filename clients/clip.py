"""`shmheap clip`: the daemon's clipboard from the shell.

    echo hello | shmheap clip copy        (in one shell)
    shmheap clip paste                    (in another: prints hello)

copy reads stdin (or a file) and puts it on the clipboard: as text (CF_UNICODETEXT, which
Windows-style readers also get as CF_TEXT and CF_OEMTEXT) when it is UTF-8, else as bytes
under "application/octet-stream"; `--format NAME` picks the format (a CF_* name, "text", or
any name, registered on first use). paste writes a format to stdout (text as UTF-8), exit
status 1 if it is not there. list shows the formats; watch prints a line per change until
interrupted; clear empties the clipboard.
"""

import argparse
import functools
import sys

import shmheap
from shmheap.clipboard import BINARY_FORMAT

from .cli import SOCKET_HELP


def _copy(clipboard, args):
    if args.file is None or args.file == "-":
        data = sys.stdin.buffer.read()
    else:
        with open(args.file, "rb") as f:
            data = f.read()
    if args.format is None:
        try:
            payload, fmt = data.decode("utf-8"), "text"
        except UnicodeDecodeError:
            payload, fmt = data, BINARY_FORMAT
    else:
        fmt = args.format
        if clipboard.format_id(fmt) in shmheap.clipboard.TEXT_CODECS:
            try:
                payload = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                print(f"shmheap clip copy: {fmt} is text, and the input is not UTF-8 ({exc.reason} at"
                      f" byte {exc.start}): give a binary --format", file=sys.stderr)
                return 1
        else:
            payload = data
    clipboard.copy(payload, format=fmt)
    return 0


def _paste(clipboard, args):
    data = clipboard.paste(args.format, timeout=args.timeout)
    sys.stdout.buffer.write(data.encode("utf-8") if isinstance(data, str) else data)
    sys.stdout.buffer.flush()
    return 0


def _list(clipboard, args):
    formats = clipboard.formats()
    if not formats:
        print("the clipboard is empty")
    for f in formats:
        if f.size is not None:
            size = f"{f.size:,} bytes"
        else:
            size = "made when pasted" if f.synthesized else "promised: rendered when pasted"
        print(f"{f.id:#06x}  {f.name:<32} {size}{'  (synthesized)' if f.synthesized else ''}")
    return 0


def _watch(clipboard, args):
    sequence = clipboard.sequence
    print(f"sequence {sequence}: watching (Ctrl-C to stop)", flush=True)
    try:
        while True:
            moved = clipboard.wait(sequence, timeout=args.timeout)
            if moved is None:
                print(f"no change within {args.timeout} s", flush=True)
                return 0
            sequence = moved
            names = ", ".join(f.name for f in clipboard.formats()) or "empty"
            print(f"sequence {sequence}: {names}", flush=True)
    except KeyboardInterrupt:
        return 0


def _clear(clipboard, args):
    clipboard.clear()
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="shmheap clip", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help=SOCKET_HELP)
    # --socket also after the command (`shmheap clip paste --socket S`), as on every other command
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--socket", default=argparse.SUPPRESS, help=SOCKET_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(commands.add_parser, parents=[after])
    copy = add("copy", help="put stdin (or FILE) on the clipboard")
    copy.add_argument("file", nargs="?", help="a file to copy instead of stdin")
    copy.add_argument("--format", help="the format: a CF_* name, 'text', or any name (default: text if UTF-8)")
    paste = add("paste", help="write the clipboard to stdout")
    paste.add_argument("--format", help="the format to paste (default: text, else the first)")
    paste.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a promised format")
    add("list", help="the formats on the clipboard, with their sizes")
    watch = add("watch", help="print a line per change until interrupted")
    watch.add_argument("--timeout", type=float, default=None, help="stop after this many quiet seconds")
    add("clear", help="empty the clipboard")
    args = parser.parse_args(argv)
    actions = {"copy": _copy, "paste": _paste, "list": _list, "watch": _watch, "clear": _clear}
    try:
        with shmheap.connect(args.socket) as client:
            return actions[args.command](client.clipboard, args)
    except shmheap.ShmheapError as exc:
        print(f"shmheap clip {args.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file that cannot be read, stdout closed
        print(f"shmheap clip {args.command}: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
