"""A child process that stops itself when its parent is gone. Its own module, light to import: the manager
process of packed runs starts by importing it (spawn), and would otherwise import torch for nothing."""
from __future__ import annotations

import os


def watch_parent(parent: int, every: float = 0.5) -> None:
    """In a worker process: exit as soon as ``parent`` is gone (the worker is then adopted by another process).
    Its run resumes from its last checkpoint next time; every file it writes is replaced atomically."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()
