"""shmheapd: the daemon that plays the kernel for shmheap clients (see ../shared/DESIGN.md).

Modules, one per layer: pagetable (VirtualAlloc layer and its backing), sessions (connections
and processes), reaper (release on process exit), server (event loop and dispatch), main
(assembles the stack).
"""
