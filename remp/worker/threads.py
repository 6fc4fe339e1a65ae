"""OpenMP threads of a worker process's threads: the steps' team on the main thread, one thread
for the builder beside it."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch


def use_threads(n: int) -> None:
    """Run this thread's torch ops on `n` OpenMP threads, for good. PyTorch sets up each thread's
    count lazily, at its first parallel op, from the process-wide count that the last
    set_num_threads on *any* thread stored: a thread that sets its count before that op takes
    whatever count another thread sets later (the builder would copy with the count a commit on
    the main thread set). Reading the count first does the setting-up now."""
    torch.get_num_threads()
    torch.set_num_threads(n)


def background_pool() -> ThreadPoolExecutor:
    """The one thread that builds targets and pre-copies KV beside the steps. Its copies run on
    one OpenMP thread: a team of its own would spin at every barrier against the steps' team for
    the same cores, slowing the steps more than the copies gain."""
    return ThreadPoolExecutor(1, thread_name_prefix="remp-prepare", initializer=use_threads, initargs=(1,))
