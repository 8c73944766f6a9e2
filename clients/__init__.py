"""Client programs: the `shmheap` command-line tool (demo, bench, status)."""
