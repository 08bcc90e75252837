"""Executors: the physical I/O of each backend kind. They know nothing of Postgres or FUSE."""
