"""shmheap: the Windows memory model (VirtualAlloc, heaps, global memory) over one shared
segment owned by the `shmheapd` daemon. See ../shared/DESIGN.md for the layers.

    import shmheap
    with shmheap.connect() as client:   # starts an embedded daemon if none listens
        ...
    from shmheap.win32 import VirtualAlloc, MEM_COMMIT, PAGE_READWRITE
"""

from .client import Client, close_default, connect, default_client
from .clipboard import Clipboard, Format
from .errors import (GuardPageError, ProtocolError, ShmheapError, ShmheapLookupError, ShmheapMemoryError,
                     ShmheapPermissionError, ShmheapValueError, WinError)
from .private_heap import Block, PrivateHeap
from .shared_buffer import SharedBuffer

__all__ = ["Client", "connect", "default_client", "close_default", "PrivateHeap", "Block",
           "SharedBuffer", "Clipboard", "Format", "WinError", "ShmheapError", "ShmheapMemoryError",
           "ShmheapPermissionError", "ShmheapValueError", "ShmheapLookupError", "GuardPageError",
           "ProtocolError"]
__version__ = "0.1.0"
