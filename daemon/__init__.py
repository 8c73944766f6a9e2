"""shmheapd: the daemon that plays the kernel for shmheap clients (see ../shared/DESIGN.md).

Modules, one per layer: pagetable (VirtualAlloc layer and its backing), heaps (registry of the
clients' private heaps), handles (global memory: the global heap and GlobalAlloc's objects),
sections (named file mappings), sessions (connections and processes), reaper (release on
process exit), kernel (builds all of them and holds the op table), server (event loop and
dispatch), main (assembles the stack).
"""
