"""shmheap: the Windows memory model (VirtualAlloc, heaps, global memory) over one shared
segment owned by the `shmheapd` daemon. The README says how to use it; each module's
docstring explains its layer.

    import shmheap
    with shmheap.connect() as client:   # starts an embedded daemon if none listens
        ...
    from shmheap.win32 import VirtualAlloc, MEM_COMMIT, PAGE_READWRITE
"""

import sys

if not sys.platform.startswith("linux"):  # MADV_REMOVE, SO_PEERCRED, MAP_FIXED_NOREPLACE, /proc
    raise ImportError(f"shmheap runs on Linux only, not on {sys.platform}")

from .client import Client, close_default, connect, default_client  # noqa: E402
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
