"""shmheapd: the daemon that owns the segment. `main()` assembles the whole stack:

    lock beside the socket -> Kernel (segment, page table, services) -> listener -> Server
"""

import argparse
import ctypes
import fcntl
import logging
import os
import resource
import shlex
import signal
import sys

from shmheap import __version__, segment
from shmheap.errors import ShmheapError

from .access import READ_WRITE, SEARCH, Access, parse_group, parse_id
from .kernel import Kernel
from .server import HANDSHAKE_TIMEOUT, STOP_SIGNALS, Server, listen, peer_is_listening

log = logging.getLogger("shmheapd")

DEFAULT_IDLE_EXIT = 0  # foreground daemons run until stopped; autostart passes its own


def parse_args(argv):
    # No abbreviations: --systemd-unit passes the options it is given on by their full names.
    parser = argparse.ArgumentParser(prog="shmheapd", description="the shmheap daemon", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"shmheapd {__version__}")
    parser.add_argument("--socket", default=None, help="Unix socket path (default: $SHMHEAP_SOCKET "
                        "or $XDG_RUNTIME_DIR/shmheap/shmheapd.sock or /tmp/shmheap-$UID/)")
    parser.add_argument("--size", type=segment.parse_size, default=segment.DEFAULT_SIZE,
                        help="virtual size of the segment, e.g. 64G (sparse)")
    parser.add_argument("--commit-limit", type=segment.parse_size, default=None,
                        help="most bytes committed at once (default: free space of /dev/shm)")
    parser.add_argument("--process-commit-limit", type=segment.parse_size, default=None,
                        help="most bytes one process may commit (default: the commit limit)")
    parser.add_argument("--idle-exit", type=float, default=DEFAULT_IDLE_EXIT,
                        help="exit after this many seconds with no clients (0: never)")
    parser.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT,
                        help="seconds a connection has to say hello before it is dropped")
    parser.add_argument("--allow-uid", type=_uid, action="append", default=[],
                        help="also let in clients of this uid (repeatable)")
    parser.add_argument("--allow-group", type=_group, action="append", default=[],
                        help="also let in clients in this group, by name or gid (repeatable)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-file", default=None, help="log here instead of stderr")
    parser.add_argument("--systemd-unit", action="store_true",
                        help="print a systemd user unit that runs this daemon with these options, and exit")
    args = parser.parse_args(argv)
    args.size = segment.round_size(args.size)
    if args.size > segment.MAX_SIZE:
        parser.error("--size is at most 1T")
    return args


def systemd_unit(argv):
    """A systemd user unit running this daemon, by this interpreter (so a virtual environment's
    install runs as it is), on the default socket in the user's runtime folder (%t), logging
    to the journal, with `argv`'s other options."""
    options = []
    skip = False
    for arg in argv:  # every option but the ones the unit sets itself
        if skip:
            skip = False
        elif arg in ("--systemd-unit",):
            continue
        elif arg in ("--socket", "--log-file", "--idle-exit"):
            skip = True
        elif not arg.startswith(("--socket=", "--log-file=", "--idle-exit=")):
            options.append(_unit_word(arg))
    command = " ".join([_unit_word(sys.executable, command=True), "-m", "shmheapd", "--socket",
                        "%t/shmheap/shmheapd.sock", "--idle-exit", "0", *options])
    return f"""[Unit]
Description=shmheap daemon: one shared-memory segment for this user's processes

[Service]
Type=simple
ExecStart={command}
# SIGTERM stops it cleanly: socket and segment removed.
KillSignal=SIGTERM
Restart=on-failure

[Install]
WantedBy=default.target
"""


def _unit_word(text, command=False):
    """`text` as one word of an ExecStart line: quoted, % not taken as a specifier, and in an
    argument (not the command, where systemd expands no variables) $ not taken as one."""
    word = shlex.quote(text).replace("%", "%%")
    return word if command else word.replace("$", "$$")


def _uid(text):
    try:
        return parse_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _group(text):
    try:
        return parse_group(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _default_commit_limit(size):
    stats = os.statvfs("/dev/shm")
    return min(size, stats.f_bavail * stats.f_frsize)


def _prepare_socket_dir(path):
    """The socket's folder, made 0700 if missing; refused unless it is ours alone."""
    segment.check_private_dir(os.path.dirname(os.path.abspath(path)), create=True)


def _take_lock(path):
    """Hold an exclusive flock beside the socket for our lifetime: at most one daemon per
    socket, and whatever socket or segment we find while holding it is a dead one's."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _raise_open_file_limit():
    """As many descriptors as the hard limit allows: one per connection (1024 by default is
    a thousand clients)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
        except (ValueError, OSError):
            pass


def _name_the_process():
    """`pgrep shmheapd` and `top` show the daemon by its name, not as `python3`."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, b"shmheapd", 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.systemd_unit:
        sys.stdout.write(systemd_unit(argv))
        return 0
    _name_the_process()
    _raise_open_file_limit()
    path = os.path.abspath(args.socket or segment.default_socket_path())
    try:
        _prepare_socket_dir(path)
    except ShmheapError as exc:
        print(f"shmheapd: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(filename=args.log_file, level=args.log_level,
                        format="%(asctime)s shmheapd[%(process)d] %(levelname)s %(message)s")

    # A stop request can come as soon as the socket exists (or before): remember it until the
    # server's own handlers take over, so the daemon always shuts down cleanly.
    early_signals = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: early_signals.append(signum))
    lock_fd = _take_lock(path)
    if lock_fd is None or peer_is_listening(path):
        print(f"shmheapd: a daemon is already running on {path}", file=sys.stderr)
        return 1
    name = segment.segment_name(path)
    if os.path.lexists(path):
        log.info("removing stale socket %s", path)
        os.unlink(path)
    segment.unlink_quietly(name)  # a dead predecessor's, since we hold the lock

    commit_limit = args.commit_limit if args.commit_limit is not None else _default_commit_limit(args.size)
    process_limit = args.process_commit_limit if args.process_commit_limit is not None else commit_limit
    try:
        kernel = Kernel(name, args.size, commit_limit, process_limit)
    except (ShmheapError, OSError) as exc:
        print(f"shmheapd: cannot build the segment {name}: {exc}", file=sys.stderr)
        os.close(lock_fd)
        return 1
    access = Access(args.allow_uid, args.allow_group)
    listener = None
    try:
        try:
            access.grant(kernel.shm.fd, READ_WRITE)
            access.grant(os.path.dirname(path), SEARCH)  # before the socket: let in from its first instant
            listener = listen(path, lambda temp: access.grant(temp, READ_WRITE))
        except OSError as exc:
            print(f"shmheapd: cannot let in {access.describe()}: {exc.strerror} "
                  f"(sharing needs POSIX ACLs on /dev/shm and on the socket's folder)", file=sys.stderr)
            return 1
        log.info("serving %s on %s (%d bytes virtual, commit limit %d; also letting in %s)",
                 name, path, args.size, commit_limit, access.describe())
        server = Server(listener, kernel, access=access,
                        idle_exit=args.idle_exit, handshake_timeout=args.handshake_timeout)
        server.serve_forever(early_signals)
    finally:
        if listener is not None:
            listener.close()
            if os.path.lexists(path):
                os.unlink(path)
        kernel.close()
        os.close(lock_fd)
        log.info("stopped; socket and segment removed")
    return 0
