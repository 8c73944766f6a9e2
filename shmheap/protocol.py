"""The wire protocol, sans I/O: bytes in, checked messages out; messages in, bytes out.

Frames are msgpack arrays on a Unix stream socket (msgpack is self-delimiting, so a frame is
one msgpack object):

    request  [msgid, op, *args]        msgid: uint64 chosen by the client, op: str
    reply    [msgid, error, result]    error: Win32 code, 0 on success; result: None on error
             [msgid, error, result, access]   when the request changed what the caller may
                                       touch: [[address, length, prot], ...] page runs, prot
                                       PROT_READ | PROT_WRITE (3), PROT_READ (1) or none (0),
                                       for the caller to apply to its mapping before it goes
                                       on (shmheap/mapping.py), success or not

Requests may be pipelined; every reply carries the msgid of its request, so one failed request
does not hide its neighbours. Two families of failure, as in h11:

    RequestError   the request is well framed but wrong (unknown op, bad arguments): the
                   daemon replies with the error code and carries on with the connection.
    ProtocolError  the peer broke the framing (not msgpack, not an array, no msgid, a frame
                   over the limits): the daemon drops that connection only.

Handshake (the first request of every connection; anything else first is refused):

    client -> daemon   [msgid, "hello", PROTOCOL_VERSION, {"pid": os.getpid()}]
    daemon -> client   [msgid, 0, {"version", "segment", "size", "page_size", "granularity",
                                   "pid" (the caller as SO_PEERCRED sees it), "daemon_pid",
                                   "generation", "commit_limit", "process_commit_limit"}]
    on a version mismatch the reply is ERROR_NOT_SUPPORTED and the connection stays unserved
    (every other request gets ERROR_ACCESS_DENIED) until a hello it can accept; a peer of
    another uid gets [0, ERROR_ACCESS_DENIED, reason] and is closed before any request.
    The client sends "heap_create" for its process heap in the same write as "hello".
    Every op but "hello" and "shutdown" is answered by the daemon's kernel (daemon/kernel.py,
    its op table).
"""

import msgpack

from .errors import ProtocolError, WinError

PROTOCOL_VERSION = 1
HELLO = "hello"  # the handshake op: the first request of every connection
SHUTDOWN = "shutdown"  # the daemon stops cleanly once it has answered (its own uid only)
SERVER_OPS = {HELLO, SHUTDOWN}  # answered by the server itself, not the kernel
# What a process tells the daemon about itself, about once a second, riding with other
# requests (heap usage for `shmheap stat`): counted apart from the requests work makes.
REPORT_OPS = {"heap_report"}

# Unpacker bounds: no frame, string or container from a peer may exceed these.
MAX_FRAME = 1 << 20
MAX_REPLY = 64 << 20  # what a client reads in one reply (a batch's results)
MAX_STR = 1 << 16
MAX_ARRAY = 1 << 17  # room for batch requests of 100k items
MAX_MAP = 1 << 10

U64_MAX = 2**64 - 1


def _u64(value):
    return type(value) is int and 0 <= value <= U64_MAX


def _u32(value):
    return type(value) is int and 0 <= value <= 0xFFFFFFFF


def _str(value):
    return type(value) is str


def _opt_str(value):
    return value is None or type(value) is str


def _bytes(value):
    return type(value) is bytes


def _map(value):
    return type(value) is dict


def _list_u64(value):
    return type(value) is list and all(_u64(item) for item in value)


def _list_u32(value):
    return type(value) is list and len(value) <= MAX_MAP and all(_u32(item) for item in value)


def _any(value):
    return True


# The op table: every message the daemon understands and the shape of its arguments.
# The same name is used by the client stub, this table and the daemon handler.
OPS = {
    HELLO: (_u32, _map),
    "echo": (_any,),
    "system_info": (),
    "memory_status": (),
    "virtual_alloc": (_u64, _u64, _u32, _u32),
    "virtual_free": (_u64, _u64, _u32),
    "virtual_query": (_u64,),
    "virtual_protect": (_u64, _u64, _u32),
    "access": (_u64, _u64, _u32),  # check before a view: address, size, want_write
    "heap_create": (_str, _u32, _u64, _u64, _u64),  # name, flags, reserve, commit, maximum
    "heap_extend": (_u64, _u64),  # handle, size
    "heap_commit": (_u64, _u64, _u64),  # handle, address, size
    # handle, blocks, free bytes, largest free range, when (ms since the epoch) it was so
    "heap_report": (_u64, _u64, _u64, _u64, _u64),
    "heap_decommit": (_u64, _u64, _u64),
    "heap_release": (_u64, _u64),  # handle, region base
    "heap_destroy": (_u64,),
    "heap_list": (),
    # GlobalAlloc family: each returns the Win32 value; a failure is an error reply.
    "global_alloc": (_u32, _u64),  # flags, size -> handle
    "global_alloc_many": (_u32, _list_u64),  # flags, sizes: all or none -> [[handle, serial], ...]
    "global_free": (_u64,),  # -> None
    "global_realloc": (_u64, _u64, _u32),  # handle, size, flags -> handle
    "global_size": (_u64,),
    "global_lock": (_u64,),  # -> data pointer
    "global_unlock": (_u64,),  # -> still locked
    "global_flags": (_u64,),
    "global_handle": (_u64,),  # data pointer -> handle
    "global_compact": (_u64,),  # -> largest free block
    # SharedBuffer lifetimes: pointer, serial (from global_alloc_many)
    "global_attach": (_u64, _u64),  # take a hold on a buffer handed over (unpickled)
    "global_release": (_u64, _u64),  # let go of it
    "global_pin": (_u64, _u64),  # keep it for a pickled copy on its way
    "section_create": (_u32, _u64, _opt_str),  # protect, size, name -> [handle, existed]
    "section_open": (_u32, _str),  # access, name -> handle
    "section_map": (_u64, _u32, _u64, _u64),  # handle, access, offset, size -> address
    "section_unmap": (_u64,),  # an address in a view -> [view base, whether one of the section's remains]
    "section_close": (_u64,),
    "section_list": (),
    "section_query": (_u64,),  # handle -> [base, size, protect, file-backed]
    # File-backed sections (daemon/sections.py): the file's descriptor travels beside the frame
    # (SCM_RIGHTS), to the daemon with the create, back with the reply to "file_mapping_file".
    "file_mapping_create": (_u32, _u64, _opt_str),  # protect, size, name -> [handle, existed, size]
    "file_mapping_file": (_u64,),  # handle -> True, and the file's descriptor
    # The clipboard (daemon/clipboard.py). "clipboard_get", "clipboard_wait" and
    # "clipboard_listen" may be answered later (a render, a change): clients send them on a
    # connection of their own.
    "clipboard_open": (_u64,),  # window
    "clipboard_close": (),  # -> the sequence number
    "clipboard_empty": (),
    "clipboard_set": (_u32, _u64),  # format, handle (0: rendered when asked for) -> handle
    "clipboard_get": (_u32, _u32),  # format, may wait for a render (else ERROR_IO_PENDING) -> handle
    "clipboard_available": (_u32,),
    "clipboard_enum": (_u32,),  # format (0: from the first) -> the next, or 0
    "clipboard_priority": (_list_u32,),  # formats -> the first there, 0 or -1
    "clipboard_info": (),  # -> {sequence, owner, owner_pid, open_window, opener, formats}
    "clipboard_register": (_str,),  # name -> format
    "clipboard_format_name": (_u32,),  # -> name
    "clipboard_wait": (_u64,),  # after -> the sequence number, once past it
    "clipboard_listen": (_u32,),  # may wait -> a format this process is asked to render (0: none yet)
    "status": (),
    "stat": (),  # -> clients/stat.py documents the schema
    "page_map": (),  # -> every region's pages as runs (clients/map.py)
    "check": (),
    SHUTDOWN: (),
}


class RequestError(Exception):
    """A well-framed request the daemon refuses; it answers with `code` and carries on."""

    def __init__(self, msgid, code, message):
        super().__init__(message)
        self.msgid = msgid
        self.code = code


def new_unpacker(limit=MAX_FRAME):
    return msgpack.Unpacker(
        raw=False,
        max_buffer_size=limit,
        max_str_len=MAX_STR,
        max_bin_len=limit,
        max_array_len=MAX_ARRAY,
        max_map_len=MAX_MAP,
        max_ext_len=0,
        strict_map_key=True,
    )


class Decoder:
    """Feed bytes, get whole frames back. Raises ProtocolError on anything that is not msgpack
    within the limits; after that the connection is unusable and must be closed."""

    def __init__(self, limit=MAX_FRAME):
        self._unpacker = new_unpacker(limit)
        self.limit = limit  # bytes a frame may have (the daemon's requests: MAX_FRAME)
        self._fed = 0  # bytes fed in all
        self._frame_start = 0  # offset, in all that was fed, of the frame not yet whole

    def feed(self, data):
        try:
            self._unpacker.feed(data)
            self._fed += len(data)
            frames = []
            for frame in self._unpacker:
                frames.append(frame)
                self._frame_start = self._unpacker.tell()  # where the next frame starts
            # The unpacker's own bound is on what it buffers, and it lets go of what it has
            # parsed of an unfinished frame: the frame's whole size is bounded here.
            if self._fed - self._frame_start > self.limit:
                raise ProtocolError(WinError.ERROR_BAD_LENGTH, "frame exceeds the size limit")
            return frames
        except msgpack.BufferFull:
            raise ProtocolError(WinError.ERROR_BAD_LENGTH, "frame exceeds the size limit") from None
        except (ValueError, msgpack.UnpackException, UnicodeDecodeError) as exc:
            # ValueError covers ExtraData, FormatError, StackError and the length limits.
            raise ProtocolError(WinError.ERROR_INVALID_PARAMETER, f"malformed frame: {exc}") from None


_packer = msgpack.Packer()


def encode_request(msgid, op, args):
    return _packer.pack([msgid, op, *args])


def encode_reply(msgid, error, result, access=None):
    return _packer.pack([msgid, int(error), result, access] if access else [msgid, int(error), result])


def parse_request(frame):
    """Check a request frame. Returns (msgid, op, args); raises RequestError or ProtocolError."""
    if type(frame) is not list or not frame or not _u64(frame[0]):
        raise ProtocolError(WinError.ERROR_INVALID_PARAMETER, "a request is [msgid, op, *args]")
    msgid = frame[0]
    if len(frame) < 2 or type(frame[1]) is not str:
        raise RequestError(msgid, WinError.ERROR_INVALID_FUNCTION, "missing op")
    op, args = frame[1], frame[2:]
    spec = OPS.get(op)
    if spec is None:
        raise RequestError(msgid, WinError.ERROR_INVALID_FUNCTION, f"unknown op {op[:64]!r}")
    if len(args) != len(spec):
        raise RequestError(msgid, WinError.ERROR_INVALID_PARAMETER, f"bad arguments for {op}")
    for check, arg in zip(spec, args):
        if not check(arg):
            raise RequestError(msgid, WinError.ERROR_INVALID_PARAMETER, f"bad arguments for {op}")
    return msgid, op, args


def hello_request(pid):
    """The handshake request, as (op, args)."""
    return HELLO, (PROTOCOL_VERSION, {"pid": pid})


def parse_reply(frame):
    """Check a reply frame. Returns (msgid, error, result, access or None); raises
    ProtocolError."""
    if (type(frame) is not list or len(frame) not in (3, 4) or not _u64(frame[0]) or not _u64(frame[1])
            or (len(frame) == 4 and not _access_runs(frame[3]))):
        raise ProtocolError(WinError.ERROR_INVALID_PARAMETER, f"malformed reply {frame!r:.80}")
    return frame[0], frame[1], frame[2], frame[3] if len(frame) == 4 else None


def _access_runs(value):
    return type(value) is list and all(
        type(run) is list and len(run) == 3 and _u64(run[0]) and _u64(run[1]) and run[2] in (0, 1, 3)
        for run in value)
