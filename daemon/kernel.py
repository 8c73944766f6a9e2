"""The kernel: the daemon's whole state, built in one place, and the op table over it.

    segment ─ Backing ─ PageTable ─┬─ Heaps          (the clients' private heaps)
                                   ├─ GlobalMemory   (GlobalAlloc's objects, the global heap)
                                   ├─ Sections       (named file mappings)
                                   └─ Clipboard      (over GlobalMemory: formats, owner, waiters)
    Sessions                       (connections and processes; the reaper on the last close)

`Kernel` creates the segment, maps it and builds each service over the page table; `main()`
and the tests both build it this way. The services reach one another only through public
methods; the wiring between them is here: the page table asks the global memory to give back
its cache under commit pressure, and the server's loop calls `housekeeping`. The server
also tells each request's caller (`request`: session and msgid) and answers requests a
service parks (`respond`, for the clipboard's waits).

`ops` is the op table: every op of `shmheap.protocol.OPS` but "hello" (the server's, since it
is about the connection) maps to a service method called as `method(pid, *args)`, named as
the op is in the client's stub, so one grep finds a message's life.
"""

import os
import time

from shmheap import segment
from shmheap.errors import ShmheapError, WinError, raise_for
from shmheap.protocol import OPS, PROTOCOL_VERSION, SERVER_OPS

from .clipboard import Clipboard
from .handles import GlobalMemory
from .heaps import Heaps
from .pagetable import SYSTEM, Backing, PageTable
from .reaper import release_process
from .sections import Sections
from .sessions import Sessions


def fragmentation(free, largest_free):
    """How broken up a heap's free space is: 0 when it is one range (or there is none), near 1
    when the largest range is a sliver of it (1 - largest / free, as allocators report it)."""
    return round(1 - largest_free / free, 3) if free else 0.0


def _heap_row(row, now):
    """A heap of the stat: the registry's figures, and its owner's latest report of what lies
    inside (None until the first), with how many seconds old that report is."""
    usage = row["usage"]
    inside = {"blocks": None, "free": None, "largest_free": None,
              "fragmentation": None, "reported": None}
    if usage is not None:
        inside = {key: usage[key] for key in ("blocks", "free", "largest_free")}
        inside["fragmentation"] = fragmentation(usage["free"], usage["largest_free"])
        inside["reported"] = round(max(0.0, now - usage["as_of"]), 3)
    return dict({key: row[key] for key in ("handle", "name", "owner", "reserved", "committed")}, **inside)


def _command_of(pid):
    """A process's command name, as `ps` shows it ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


class Kernel:
    shm = base = global_memory = None  # a half-built kernel is safe to close

    def __init__(self, name, size, commit_limit, process_commit_limit):
        self.name = name
        self.size = size
        self.shm, self.base = segment.create(name, size, os.getpid(), time.time_ns())
        try:
            self.memory = segment.address_space(self.base + size)  # the global heap's bytes
            self.pagetable = PageTable(self.base, size, Backing(self.shm.fd, self.base), commit_limit,
                                       process_commit_limit, reclaim=self._reclaim,
                                       shared_access=self._shared_access)
            self.heaps = Heaps(self.pagetable)
            self.global_memory = GlobalMemory(self.pagetable, self.memory)
            self.sections = Sections(self.pagetable)
            self.clipboard = Clipboard(self.global_memory, respond=lambda *reply: self.respond(*reply))
            self.sessions = Sessions()
        except BaseException:
            self.close()
            raise
        self.info = {"version": PROTOCOL_VERSION, "segment": name, "size": size, "base": self.base,
                     "page_size": segment.PAGE_SIZE, "granularity": segment.ALLOCATION_GRANULARITY,
                     "min_address": self.pagetable.start, "daemon_pid": os.getpid(),
                     "generation": segment.read_header(self.shm.fd).generation,
                     "commit_limit": commit_limit, "process_commit_limit": process_commit_limit}
        self.ops = self._op_table()
        self.request = (None, 0)  # (session, msgid) of the request being answered: set by the server
        self.reply_fd = None  # a descriptor the reply to it carries (SCM_RIGHTS)
        self.respond = None  # (session, msgid, error, result) -> None: the server's, for parked requests

    def _op_table(self):
        pages, heaps, memory, sections = self.pagetable, self.heaps, self.global_memory, self.sections
        clip = self.clipboard
        table = {
            "echo": lambda pid, value: value,
            "system_info": self.system_info,
            "memory_status": self.memory_status,
            "virtual_alloc": pages.virtual_alloc,
            "virtual_free": pages.virtual_free,
            "virtual_query": pages.virtual_query,
            "virtual_protect": pages.virtual_protect,
            "access": pages.access,
            "heap_create": lambda pid, *args: heaps.create(pid, *args, session=self.request[0]),
            "heap_extend": heaps.extend,
            "heap_commit": heaps.commit,
            "heap_decommit": heaps.decommit,
            "heap_report": heaps.report,
            "heap_release": heaps.release,
            "heap_destroy": heaps.destroy,
            "heap_list": lambda pid: heaps.list(),
            "global_alloc": memory.alloc,
            "global_alloc_many": memory.alloc_many,
            "global_free": memory.free,
            "global_realloc": memory.realloc,
            "global_size": memory.size,
            "global_lock": memory.lock,
            "global_unlock": memory.unlock,
            "global_flags": memory.flags,
            "global_handle": memory.handle,
            "global_compact": memory.compact,
            "global_attach": memory.attach,
            "global_release": memory.release,
            "global_pin": lambda pid, pointer, serial: memory.pin(pid, pointer, serial, time.monotonic()),
            "section_create": sections.create,
            "section_open": lambda pid, access, name: sections.open(pid, access, name, self._caller_uid()),
            "section_map": sections.map,
            "section_unmap": sections.unmap,
            "section_close": sections.close,
            "section_list": lambda pid: sections.list(),
            "section_query": sections.query,
            "file_mapping_create": lambda pid, protect, size, name: sections.create_file(
                pid, self._passed_fd(), protect, size, name, self._caller_uid()),
            "file_mapping_file": lambda pid, handle: self._reply_with_fd(
                *sections.file_of(pid, handle, self._caller_uid())),
            "clipboard_open": clip.open,
            "clipboard_close": clip.close,
            "clipboard_empty": clip.empty,
            "clipboard_set": clip.set,
            "clipboard_get": lambda pid, fmt, wait: clip.get(pid, self.request, fmt, wait),
            "clipboard_available": clip.available,
            "clipboard_enum": clip.enum,
            "clipboard_priority": clip.priority,
            "clipboard_info": clip.info,
            "clipboard_register": clip.register,
            "clipboard_format_name": clip.format_name,
            "clipboard_wait": lambda pid, after: clip.wait(pid, self.request, after),
            "clipboard_listen": lambda pid, wait: clip.listen(pid, self.request, wait),
            "status": self.status,
            "stat": self.stat,
            "page_map": self.page_map,
            "check": lambda pid: self.check(),
        }
        if set(table) != set(OPS) - SERVER_OPS:
            raise RuntimeError(f"the op table and protocol.OPS disagree: {set(table) ^ set(OPS)}")
        return table

    # ---- processes -----------------------------------------------------------------------

    def attach(self, session):
        """A connection said hello: its process now exists for every service, and the reply
        tells its mapping everything it may touch (a client reconnecting after a loss
        starts from the truth, not from what it was told before)."""
        self.sessions.attach(session)
        self.pagetable.touch(self.pagetable.base, self.pagetable.end)

    def detach(self, session):
        """A connection closed; the last of a process's takes everything it held with it."""
        self.clipboard.detach(session)
        process = self.sessions.detach(session)
        if process is not None:
            release_process(process.pid, self)
        else:
            self.heaps.release_session(session)  # its heaps; the process keeps the rest

    def outliving(self):
        """What would be lost if the daemon exited now, in words ('' if nothing): memory
        meant to outlive the processes that made it (GMEM_SHARE objects, keep=True buffers)."""
        shared = self.global_memory.shared_objects
        return f"{shared} shared global objects outlive their processes" if shared else ""

    # ---- each process's mapping ----------------------------------------------------------

    def begin(self):
        """A request starts: nothing touched yet, no descriptor to send."""
        self.pagetable.touched.clear()
        self.reply_fd = None

    def _caller_uid(self):
        """The uid of the process whose request is being answered (SO_PEERCRED)."""
        session = self.request[0]
        return os.getuid() if session is None else session.uid

    def _passed_fd(self):
        """The descriptor the caller sent with this request (SCM_RIGHTS), now ours to keep
        or close."""
        session = self.request[0]
        if not session.fds:
            raise_for(WinError.ERROR_INVALID_HANDLE, "no file descriptor came with the request")
        return session.fds.pop(0)

    def _reply_with_fd(self, fd, owned):
        """The reply carries `fd` (the server attaches it); an `owned` one is closed once sent."""
        self.reply_fd = (fd, owned)
        return True

    def take_reply_fd(self):
        """(fd, owned) the reply to carry, now the server's to send."""
        reply_fd, self.reply_fd = self.reply_fd, None
        return reply_fd

    def access_changes(self, pid):
        """What the request just answered changed in what `pid` may touch (PageTable.touch),
        for its reply: [[address, length, prot], ...], or None."""
        if not self.pagetable.touched:
            return None
        changes = []
        for start, end in self.pagetable.take_touched():
            changes += self.pagetable.access_runs(pid, start, end)
        return changes or None

    # ---- periodic work -------------------------------------------------------------------

    def housekeeping(self, now):
        """Work due by time; returns the seconds until it is due again, or None."""
        due = [seconds for seconds in (self.global_memory.housekeeping(now), self.clipboard.housekeeping(now))
               if seconds is not None]
        return min(due) if due else None

    def _shared_access(self, pid, start, end):
        """What `pid` may touch of the global heap: what it holds (GlobalMemory)."""
        return self.global_memory.access_runs(pid, start, end)

    def _reclaim(self):
        """The page table is short of commit: give back what is kept only as a cache (none
        while the global memory is being built)."""
        return self.global_memory.release_cache() if self.global_memory is not None else 0

    # ---- the ops the kernel answers itself -----------------------------------------------

    def system_info(self, pid):
        return dict(self.info, pid=pid)

    def memory_status(self, pid):
        table = self.pagetable
        return {"commit_limit": table.commit_limit, "committed": table.committed,
                "process_committed": table.committed_by(pid),
                "process_commit_limit": table.process_commit_limit,
                "resident": table.resident_bytes(),
                "total_virtual": table.end - table.start,
                "free_virtual": table.free_bytes()}

    def stat(self, pid):
        """What `shmheap stat` shows (its docstring documents the schema): totals, each
        process, each heap, global memory, sections and the clipboard, as the daemon sees them."""
        table, memory = self.pagetable, self.global_memory
        by_kind = {}  # (owner, kind) -> [reserved, committed]
        for region in table.regions_in_order():
            figures = by_kind.setdefault((region.owner, region.kind), [0, 0])
            figures[0] += region.size
            figures[1] += region.committed
        reserved = sum(figures[0] for figures in by_kind.values())
        heaps = self.heaps.list()
        owned = {}
        for owner in memory.owners.values():
            owned[owner] = owned.get(owner, 0) + 1
        processes = []
        for row in self.sessions.rows():
            pid_ = row["pid"]
            private, heap_pages = by_kind.get((pid_, "private"), [0, 0]), by_kind.get((pid_, "heap"), [0, 0])
            processes.append({
                "pid": pid_, "command": _command_of(pid_), "connections": row["connections"],
                "reserved": private[0] + heap_pages[0], "committed": table.committed_by(pid_),
                "private_reserved": private[0], "private_committed": private[1],
                "heap_reserved": heap_pages[0], "heap_committed": heap_pages[1],
                "heaps": sum(1 for heap in heaps if heap["owner"] == pid_),
                "global_objects": owned.get(pid_, 0), "since": row["started"]})
        heap = memory.heap
        blocks, free, largest_free = heap.usage()
        now = time.time()
        return {
            "schema": 1,
            "daemon": {"pid": self.info["daemon_pid"], "segment": self.name},
            "totals": {"virtual": table.end - table.start, "reserved": reserved,
                       "committed": table.committed, "resident": table.resident_bytes(),
                       "commit_limit": table.commit_limit, "process_commit_limit": table.process_commit_limit},
            "processes": processes,
            "heaps": [_heap_row(row, now) for row in heaps],
            "global": {"objects": memory.live_objects, "shared": memory.shared_objects,
                       "bytes": heap.live_bytes - sum(heap.size(chunk) for chunk in memory.table.chunks),
                       "reserved": heap.reserved, "committed": heap.committed,
                       "free": free, "largest_free": largest_free,
                       "fragmentation": fragmentation(free, largest_free)},
            "sections": [{"handle": row["handle"], "name": row["name"], "size": row["size"], "file": row["file"],
                          "holders": len(row["handles"]), "views": sum(n for _, n in row["views"])}
                         for row in self.sections.list()],
            "clipboard": self.clipboard.info(pid),
        }

    def page_map(self, pid):
        """Every region's pages as runs, for `shmheap map`: {start, end, page_size, regions:
        [[base, size, owner, kind, [[first page, stop page, committed], ...]], ...]}."""
        table = self.pagetable
        return {"start": table.start, "end": table.end, "page_size": segment.PAGE_SIZE,
                "regions": [[r.base, r.size, r.owner, r.kind,
                             [[first, stop, value != 0 or r.kind == "file"] for first, stop, value in r.runs(0, r.pages)]]
                            for r in table.regions_in_order()]}

    def status(self, pid):
        table = self.pagetable
        return {
            "daemon_pid": self.info["daemon_pid"],
            "processes": [dict(row, committed=table.committed_by(row["pid"])) for row in self.sessions.rows()],
            "regions": [[r.base, r.size, r.owner, r.kind, r.committed_pages] for r in table.regions_in_order()],
            "committed": table.committed,
            "resident": table.resident_bytes(),
            "global_objects": self.global_memory.live_objects,
            "sections": self.sections.count,
        }

    def check(self):
        """Walk every service's invariants, and theirs together: every region a process owns
        belongs to a live process. Raises ShmheapError (ERROR_GEN_FAILURE) naming what broke."""
        try:
            result = dict(self.pagetable.check())
            for service in (self.heaps, self.global_memory, self.sections, self.clipboard, self.sessions):
                result.update(service.check())
            orphans = {region.owner for region in self.pagetable.regions_in_order()
                       if region.owner != SYSTEM and region.owner not in self.sessions.processes}
            if orphans:
                raise RuntimeError(f"regions of processes that are gone: {sorted(orphans)}")
        except RuntimeError as exc:
            raise ShmheapError(WinError.ERROR_GEN_FAILURE, str(exc)) from None
        return result

    # ---- the end -------------------------------------------------------------------------

    def close(self):
        """Unmap and unlink the segment."""
        if self.shm is not None:
            segment.unmap(self.base, self.size)
            self.shm.close_fd()
            segment.unlink_quietly(self.name)
            self.shm = None
