"""SharedBuffer: bytes in global memory that every connected process can use, with no copy."""

from .segment import as_array


class SharedBuffer:
    """Bytes in global memory that every connected process can use, with no copy.

    Pickling sends only (address, size, socket): the receiving process (a pool worker,
    whatever the start method) reattaches through its own mapping of the segment, with no
    round trip to the daemon. Ownership: the process that created the buffer owns it; it is
    freed by `free()` (from any process), or when the owner exits unless made with
    keep=True. A receiver must not use a buffer after its owner freed it: hand buffers out
    for as long as the owner keeps them (as a pool does until its results are in)."""

    __slots__ = ("client", "address", "size", "owner", "__weakref__")

    def __init__(self, client, address, size, *, owner=False):
        self.client = client
        self.address = address
        self.size = size
        self.owner = owner  # made by this process (a received copy is not the owner)

    @property
    def handle(self):
        return self.address  # a fixed global object's handle is its address

    def view(self):
        """A writable memoryview of the buffer's bytes (no copy; checked as Client.view)."""
        return self.client.view(self.address, self.size, write=True)

    def numpy(self, dtype="uint8", shape=None):
        """A numpy array over the buffer's bytes (no copy). Needs numpy (the `numpy` extra)."""
        return as_array(self.view(), dtype, shape)

    def free(self):
        """GlobalFree: raises ShmheapError if the buffer is no longer live (ShmheapValueError,
        ERROR_INVALID_HANDLE; for a large one whose region went, ShmheapPermissionError,
        ERROR_NOACCESS)."""
        self.client.global_free(self.address)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.owner:
            self.free()

    def __reduce__(self):
        return _reattach, (self.address, self.size, self.client.path)

    def __repr__(self):
        return f"SharedBuffer(address={self.address:#x}, size={self.size})"


def _reattach(address, size, path):
    """Unpickling a SharedBuffer: map it through this process's client for `path`."""
    from .client import client_for  # client.py imports this module: resolve at call time

    return SharedBuffer(client_for(path), address, size)
