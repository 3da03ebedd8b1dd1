"""Build the train batches ahead of the step that takes them, in a background thread.

The loop asks for batch i; a daemon thread has already read and assembled batches i, i + 1,
... (at most `depth` of them), so the step waits on the loader (reading, a stream's
tokenizing, the host -> device copy) only when the loader is slower than the step.
"""

import queue
import threading
import time


class Prefetcher:
    """make(i) for i = first, first + 1, ... < last, in that order, at most `depth` of them
    built and not yet taken; depth 0: no thread, get(i) calls make(i). An error in make(i)
    is raised by get(i), in the caller's thread, with its own message and traceback."""

    def __init__(self, make, first: int, last: int, depth: int = 2):
        self.make, self.depth = make, depth
        self.ready = queue.Queue()  # (i, batch, error) in order; the slots bound its size
        self.slots = threading.Semaphore(depth)  # one per batch built and not yet taken
        self.stopping = threading.Event()
        self.waited_s, self.taken = 0.0, 0  # since the last waited_ms()
        self.thread = None
        if depth:
            # A daemon: a thread stuck in a slow read never keeps the process from exiting.
            self.thread = threading.Thread(target=self._fill, args=(first, last), daemon=True,
                                           name="moejax-prefetch")
            self.thread.start()

    def _fill(self, first: int, last: int):
        for i in range(first, last):
            self.slots.acquire()
            if self.stopping.is_set():
                return
            try:
                self.ready.put((i, self.make(i), None))
            except BaseException as e:  # to get(i): the step that needs batch i fails with it
                self.ready.put((i, None, e))
                return

    def get(self, i: int):
        """Batch i; the calls must ask for first, first + 1, ... in order."""
        started = time.perf_counter()
        if self.thread is None:
            batch = self.make(i)
        else:
            j, batch, error = self.ready.get()
            self.slots.release()
            if error is not None:
                raise error
            if j != i:
                raise RuntimeError(f"prefetch: asked for batch {i}, the next one is {j}")
        self.waited_s += time.perf_counter() - started
        self.taken += 1
        return batch

    def waited_ms(self) -> float:
        """Mean milliseconds get() spent waiting for a batch since the last call (0 if none)."""
        mean = 1e3 * self.waited_s / max(self.taken, 1)
        self.waited_s, self.taken = 0.0, 0
        return mean

    def close(self, timeout_s: float = 10.0):
        """Stop the thread: at once if it waits for a slot, after its make(i) if in one."""
        self.stopping.set()
        self.slots.release()  # wakes the thread if it waits for a slot
        if self.thread is not None:
            self.thread.join(timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
