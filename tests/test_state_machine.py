"""A Hypothesis state machine drives a real daemon through random sequences of operations and
compares it with a plain Python model: VirtualAlloc regions, fixed and moveable GlobalAlloc
objects (lock, unlock, size, realloc, free), private heaps and their blocks, SharedBuffers and
the clipboard. Every live thing carries a pattern derived from its identity; the invariants say
the bytes are intact, the sizes are the model's and the daemon's own check passes. Errors the
daemon returns must be the ones the model expects (freeing twice: ShmheapValueError, and so on).

One daemon per test function and one client for all its examples: each example frees what it
made at its end (teardown), so the next starts from nothing; at the end of the function the
daemon's committed bytes are back where they were.
"""

import shutil
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

import shmheap
from conftest import Daemon, wait_until
from shmheap.constants import GMEM_MOVEABLE, MEM_COMMIT, MEM_RELEASE, MEM_RESERVE, PAGE_READWRITE
from shmheap.errors import ShmheapLookupError, ShmheapValueError

SIZES = st.sampled_from([1, 7, 16, 17, 100, 1000, 4095, 4096, 4097, 20_000, 65_536, 70_000, 300_000])
PICK = st.integers(min_value=0, max_value=10_000)
FORMATS = ["x", "y", "z"]
LIMIT = 8  # live objects of each kind at most: the invariants read them all every step
CHECK_EVERY = 4  # steps between the daemon's own (slower) check


def pattern(tag, size):
    unit = (tag * 0x9E3779B97F4A7C15 & (2**64 - 1)).to_bytes(8, "little")
    return (unit * (size // 8 + 1))[:size]


class Model(RuleBasedStateMachine):
    """The model: what should exist, and the tag of the pattern in each byte."""

    client = None  # set by the test function: one client for every example

    def __init__(self):
        super().__init__()
        self.tags = iter(range(1, 2**40))
        self.regions = {}  # base -> (size, tag)
        self.released_regions = set()
        self.fixed = {}  # pointer -> (size, tag)
        self.moveable = {}  # handle -> [size, tag, locks]
        self.stale_handles = set()  # moveable handles freed: stale forever
        self.stale_pointers = set()  # fixed pointers freed (an address may come back)
        self.heaps = []  # [PrivateHeap, {address: (Block, size, tag)}]
        self.destroyed = []  # (PrivateHeap, [Block, ...]) of heaps destroyed
        self.freed_blocks = []  # (PrivateHeap, address, Block)
        self.buffers = {}  # id -> (SharedBuffer, tag)
        self.freed_buffers = []
        self.clipboard = {}  # format -> bytes
        self.steps = 0

    @initialize()
    def start(self):
        self.client.clipboard.clear()  # an example starts from an empty clipboard
        self.heaps.append([self.client.heap, {}])  # the process heap, which is never destroyed

    # ---- VirtualAlloc ----------------------------------------------------------------------

    @precondition(lambda self: len(self.regions) < LIMIT)
    @rule(size=SIZES)
    def virtual_alloc(self, size):
        base = self.client.virtual_alloc(0, size, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
        assert base not in self.regions
        assert bytes(self.client.view(base, size)) == bytes(size)  # fresh pages read zeros
        tag = next(self.tags)
        self.client.view(base, size, write=True)[:] = pattern(tag, size)
        self.regions[base] = (size, tag)
        self.released_regions.discard(base)

    @precondition(lambda self: self.regions)
    @rule(pick=PICK)
    def virtual_free(self, pick):
        base = sorted(self.regions)[pick % len(self.regions)]
        self.check_region(base)
        assert self.client.virtual_free(base, 0, MEM_RELEASE)
        del self.regions[base]
        self.released_regions.add(base)

    @precondition(lambda self: self.released_regions - set(self.regions))
    @rule(pick=PICK)
    def virtual_free_twice(self, pick):
        stale = sorted(self.released_regions - set(self.regions))
        with pytest.raises(ShmheapValueError):
            self.client.virtual_free(stale[pick % len(stale)], 0, MEM_RELEASE)

    def check_region(self, base):
        size, tag = self.regions[base]
        assert bytes(self.client.view(base, size)) == pattern(tag, size), f"region {base:#x} changed"

    # ---- GlobalAlloc -------------------------------------------------------------------------

    @precondition(lambda self: len(self.fixed) < LIMIT)
    @rule(size=SIZES)
    def global_alloc_fixed(self, size):
        pointer = self.client.global_alloc(0, size)
        assert pointer not in self.fixed and pointer not in self.moveable
        tag = next(self.tags)
        self.client.view(pointer, size, write=True)[:] = pattern(tag, size)
        self.fixed[pointer] = (size, tag)
        self.stale_pointers.discard(pointer)

    @precondition(lambda self: len(self.moveable) < LIMIT)
    @rule(size=SIZES)
    def global_alloc_moveable(self, size):
        handle = self.client.global_alloc(GMEM_MOVEABLE, size)
        assert handle not in self.moveable and handle not in self.stale_handles, "a handle came back"
        tag = next(self.tags)
        pointer = self.client.global_lock(handle)
        self.client.view(pointer, size, write=True)[:] = pattern(tag, size)
        assert self.client.global_unlock(handle) is False
        self.moveable[handle] = [size, tag, 0]

    @precondition(lambda self: self.fixed)
    @rule(pick=PICK)
    def global_free_fixed(self, pick):
        pointer = sorted(self.fixed)[pick % len(self.fixed)]
        self.check_fixed(pointer)
        self.client.global_free(pointer)
        del self.fixed[pointer]
        self.stale_pointers.add(pointer)

    @precondition(lambda self: self.moveable)
    @rule(pick=PICK)
    def global_free_moveable(self, pick):
        handle = sorted(self.moveable)[pick % len(self.moveable)]
        self.check_moveable(handle)
        self.client.global_free(handle)  # locked or not
        del self.moveable[handle]
        self.stale_handles.add(handle)

    @precondition(lambda self: self.stale_handles or self.stale_pointers - set(self.fixed))
    @rule(pick=PICK, op=st.sampled_from(["global_free", "global_lock", "global_size", "global_flags"]))
    def global_stale(self, pick, op):
        stale = sorted(self.stale_handles | (self.stale_pointers - set(self.fixed)))
        value = stale[pick % len(stale)]
        if value in self.stale_pointers and self.inside_a_live_fixed_object(value):
            return  # a freed address that now lies within a newer object: no longer stale
        with pytest.raises(ShmheapValueError):
            getattr(self.client, op)(value)

    def inside_a_live_fixed_object(self, address):
        return any(pointer <= address < pointer + size for pointer, (size, _) in self.fixed.items())

    @precondition(lambda self: self.moveable)
    @rule(pick=PICK)
    def global_lock(self, pick):
        handle = sorted(self.moveable)[pick % len(self.moveable)]
        entry = self.moveable[handle]
        if entry[2] >= 5:
            return
        pointer = self.client.global_lock(handle)
        entry[2] += 1
        size, tag, _ = entry
        assert bytes(self.client.view(pointer, size)) == pattern(tag, size)

    @precondition(lambda self: self.moveable)
    @rule(pick=PICK)
    def global_unlock(self, pick):
        handle = sorted(self.moveable)[pick % len(self.moveable)]
        entry = self.moveable[handle]
        if entry[2] == 0:
            with pytest.raises(ShmheapValueError):  # ERROR_NOT_LOCKED
                self.client.global_unlock(handle)
            return
        entry[2] -= 1
        assert self.client.global_unlock(handle) == bool(entry[2])

    @precondition(lambda self: self.moveable or self.fixed)
    @rule(pick=PICK, size=SIZES)
    def global_realloc(self, pick, size):
        handles = sorted(self.moveable) + sorted(self.fixed)
        handle = handles[pick % len(handles)]
        if handle in self.moveable:
            old, tag, locks = self.moveable[handle]
            if locks:
                return  # a locked object grows in place only, or not at all: not the model's call
            self.check_moveable(handle)
            assert self.client.global_realloc(handle, size, 0) == handle  # the handle stays
            pointer = self.client.global_lock(handle)
            assert bytes(self.client.view(pointer, min(old, size))) == pattern(tag, min(old, size))
            new_tag = next(self.tags)
            self.client.view(pointer, size, write=True)[:] = pattern(new_tag, size)
            self.client.global_unlock(handle)
            self.moveable[handle] = [size, new_tag, 0]
        else:
            old, tag = self.fixed[handle]
            self.check_fixed(handle)
            pointer = self.client.global_realloc(handle, size, GMEM_MOVEABLE)  # may move
            assert bytes(self.client.view(pointer, min(old, size))) == pattern(tag, min(old, size))
            new_tag = next(self.tags)
            self.client.view(pointer, size, write=True)[:] = pattern(new_tag, size)
            del self.fixed[handle]
            if pointer != handle:
                self.stale_pointers.add(handle)
            self.stale_pointers.discard(pointer)
            self.fixed[pointer] = (size, new_tag)

    def check_fixed(self, pointer):
        size, tag = self.fixed[pointer]
        assert self.client.global_size(pointer) == size
        assert bytes(self.client.view(pointer, size)) == pattern(tag, size), f"global {pointer:#x} changed"

    def check_moveable(self, handle):
        size, tag, locks = self.moveable[handle]
        assert self.client.global_size(handle) == size
        assert self.client.global_flags(handle) & 0xFF == locks  # GMEM_LOCKCOUNT
        pointer = self.client.global_lock(handle)
        try:
            assert bytes(self.client.view(pointer, size)) == pattern(tag, size), f"moveable {handle:#x} changed"
        finally:
            assert self.client.global_unlock(handle) == bool(locks)

    # ---- private heaps -----------------------------------------------------------------------

    @precondition(lambda self: len(self.heaps) < 4)
    @rule()
    def heap_create(self):
        heap = self.client.create_heap(f"model heap {next(self.tags)}")
        self.heaps.append([heap, {}])

    @precondition(lambda self: len(self.heaps) > 1)
    @rule(pick=PICK)
    def heap_destroy(self, pick):
        index = 1 + pick % (len(self.heaps) - 1)  # never the process heap
        heap, blocks = self.heaps.pop(index)
        for address in blocks:
            self.check_block(heap, blocks, address)
        heap.destroy()
        self.destroyed.append((heap, [block for block, _, _ in blocks.values()]))

    @precondition(lambda self: sum(len(blocks) for _, blocks in self.heaps) < 2 * LIMIT)
    @rule(pick=PICK, size=SIZES)
    def heap_alloc(self, pick, size):
        heap, blocks = self.heaps[pick % len(self.heaps)]
        block = heap.alloc(size)
        assert block.address not in blocks
        assert block.size == size
        tag = next(self.tags)
        block.view()[:] = pattern(tag, size)
        blocks[block.address] = (block, size, tag)

    @precondition(lambda self: any(blocks for _, blocks in self.heaps))
    @rule(pick=PICK)
    def heap_free(self, pick):
        live = [(heap, blocks, address) for heap, blocks in self.heaps for address in blocks]
        heap, blocks, address = live[pick % len(live)]
        self.check_block(heap, blocks, address)
        block = blocks.pop(address)[0]
        block.free()
        self.freed_blocks.append((heap, address, block))

    @precondition(lambda self: self.freed_blocks)
    @rule(pick=PICK)
    def heap_free_twice(self, pick):
        heap, address, block = self.freed_blocks[pick % len(self.freed_blocks)]
        blocks = next((blocks for h, blocks in self.heaps if h is heap), None)
        if blocks is not None and address in blocks:
            return  # the address was handed out again: freeing it is no mistake now
        with pytest.raises(ShmheapValueError):
            block.free()

    @precondition(lambda self: self.destroyed)
    @rule(pick=PICK, size=SIZES)
    def heap_use_destroyed(self, pick, size):
        heap, blocks = self.destroyed[pick % len(self.destroyed)]
        with pytest.raises(ShmheapValueError):
            heap.alloc(size)
        if blocks:
            with pytest.raises(ShmheapValueError):
                blocks[pick % len(blocks)].free()
        with pytest.raises(ShmheapValueError):
            heap.destroy()

    def check_block(self, heap, blocks, address):
        block, size, tag = blocks[address]
        assert block.size == size
        assert bytes(block.view()) == pattern(tag, size), f"block {address:#x} changed"

    # ---- SharedBuffer --------------------------------------------------------------------------

    @precondition(lambda self: len(self.buffers) < LIMIT)
    @rule(size=SIZES, zero=st.booleans())
    def share(self, size, zero):
        buffer = self.client.share(size, zero=zero)
        if zero:
            assert bytes(buffer.view()) == bytes(size)
        tag = next(self.tags)
        buffer.view()[:] = pattern(tag, size)
        self.buffers[id(buffer)] = (buffer, tag)

    @precondition(lambda self: self.buffers)
    @rule(pick=PICK)
    def share_free(self, pick):
        key = sorted(self.buffers)[pick % len(self.buffers)]
        buffer, tag = self.buffers.pop(key)
        assert bytes(buffer.view()) == pattern(tag, buffer.size)
        buffer.free()
        self.freed_buffers.append(buffer)

    @precondition(lambda self: self.freed_buffers)
    @rule(pick=PICK)
    def share_free_twice(self, pick):
        with pytest.raises(ShmheapValueError):
            self.freed_buffers[pick % len(self.freed_buffers)].free()

    # ---- the clipboard ---------------------------------------------------------------------------

    @rule(data=st.dictionaries(st.sampled_from(FORMATS), st.binary(min_size=1, max_size=3000), min_size=1, max_size=3))
    def clipboard_copy(self, data):
        if len(data) == 1:
            (fmt, value), = data.items()
            self.client.clipboard.copy(value, format=fmt)
        else:
            self.client.clipboard.copy(data)
        self.clipboard = dict(data)  # copy replaces every format

    @rule(fmt=st.sampled_from(FORMATS))
    def clipboard_paste(self, fmt):
        if fmt in self.clipboard:
            assert self.client.clipboard.paste(fmt) == self.clipboard[fmt]
        else:
            with pytest.raises(ShmheapLookupError):
                self.client.clipboard.paste(fmt)

    @rule()
    def clipboard_clear(self):
        self.client.clipboard.clear()
        self.clipboard = {}

    # ---- invariants ------------------------------------------------------------------------------

    @invariant()
    def everything_intact(self):
        for base in self.regions:
            self.check_region(base)
        for pointer in self.fixed:
            self.check_fixed(pointer)
        for handle in self.moveable:
            size, tag, locks = self.moveable[handle]
            assert self.client.global_size(handle) == size
            assert self.client.global_flags(handle) & 0xFF == locks
        for heap, blocks in self.heaps:
            for address in blocks:
                self.check_block(heap, blocks, address)
        for buffer, tag in self.buffers.values():
            assert bytes(buffer.view()) == pattern(tag, buffer.size), f"{buffer!r} changed"

    @invariant()
    def formats_match(self):
        names = {self.client.clipboard.format_name(f.id) for f in self.client.clipboard.formats()}
        assert {name for name in names if name in FORMATS} == set(self.clipboard)

    @invariant()
    def daemon_consistent(self):
        self.steps += 1
        if self.steps % CHECK_EVERY == 0:
            self.client.check()

    def teardown(self):
        """Free everything the example made (checking it once more), so the next starts empty."""
        if self.client is None or self.client.closed:
            return
        counted = Model.counted
        counted["examples"] = counted.get("examples", 0) + 1
        counted["steps"] = counted.get("steps", 0) + self.steps
        for kind, things in (("regions", self.regions), ("fixed", self.fixed), ("moveable", self.moveable),
                             ("heaps", self.heaps), ("buffers", self.buffers), ("clipboard", self.clipboard),
                             ("blocks", [b for _, blocks in self.heaps for b in blocks])):
            counted[kind] = counted.get(kind, 0) + len(things)
        for base in list(self.regions):
            self.check_region(base)
            self.client.virtual_free(base, 0, MEM_RELEASE)
        for pointer in list(self.fixed):
            self.check_fixed(pointer)
            self.client.global_free(pointer)
        for handle in list(self.moveable):
            self.check_moveable(handle)
            self.client.global_free(handle)
        for heap, blocks in self.heaps:
            for address in list(blocks):
                self.check_block(heap, blocks, address)
                blocks.pop(address)[0].free()
        for heap, _ in self.heaps[1:]:
            heap.destroy()
        for buffer, tag in self.buffers.values():
            assert bytes(buffer.view()) == pattern(tag, buffer.size)
            buffer.free()
        self.client.clipboard.clear()
        self.client.check()


def run_machine(size="256M", max_examples=15, steps=30):
    Model.counted = {}
    folder = tempfile.mkdtemp(prefix="sm", dir="/tmp")
    daemon = Daemon(folder, size=size).start()
    try:
        with shmheap.connect(daemon.socket, autostart=False) as client:
            baseline = client.memory_status()["committed"]
            Model.client = client
            try:
                run_state_machine_as_test(Model, settings=settings(
                    max_examples=max_examples, stateful_step_count=steps, deadline=None, derandomize=True,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
            finally:
                Model.client = None
            print(f"state machine: {Model.counted}")
            client.check()
            # Everything was freed: the daemon gives its pages back (the global heap on its tick,
            # the process heap's free pages once purged).
            client.process_heap.purge()
            wait_until(lambda: client.memory_status()["committed"] <= baseline + 64 * 1024, timeout=20,
                       interval=0.1, what=f"committed bytes back near {baseline} "
                                          f"(now {client.memory_status()['committed']})")
            client.check()
        assert daemon.proc.poll() is None, daemon.log_text()[-3000:]
    finally:
        code = daemon.stop()
        text = daemon.log_text()
        shutil.rmtree(folder, ignore_errors=True)
    assert code == 0, text[-3000:]
    assert "Traceback" not in text, text[text.index("Traceback") - 200:][:3000]


def test_state_machine():
    run_machine()


def test_state_machine_long_runs():
    """Fewer examples, more steps each: long lifetimes, reuse of freed addresses."""
    run_machine(max_examples=4, steps=80)
