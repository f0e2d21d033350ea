"""Read files into the operating system's page cache before they are needed.

A service starting on a node with a cold disk spends most of its start reading: the Python packages every
process imports (torch and its CUDA libraries, diffusers, transformers) and then the weights. `ReadAhead`
reads them in parallel threads, in the order given, while the service is still starting, so the imports and
the loaders find them in memory. It never reads more than fits the memory the system reports available.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 64 << 20  # one read task: large files are read by several threads at once
BUFFER = 8 << 20  # bytes per read call
AVAILABLE_SHARE = 0.8  # of the memory the system reports available, at most this much is read


def package_folders(names: Iterable[str]) -> list[Path]:
    """The folders of the installed top-level packages `names` (namespace packages: each of their folders),
    found without importing them; names not installed are skipped."""
    folders: list[Path] = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None:
            folders += [Path(p) for p in spec.submodule_search_locations or []]
    return folders


def files_under(paths: Iterable[Path]) -> Iterator[Path]:
    """Every regular file of `paths` (files, and folders walked in sorted order), each once."""
    seen: set[Path] = set()
    for path in paths:
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in candidates:
            real = file.resolve()
            if real not in seen and not file.is_symlink():
                seen.add(real)
                yield real


def available_memory() -> int:
    """Bytes of memory the system reports available (``MemAvailable``; 0 where it is not reported)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ReadAhead:
    """Reads `paths` (files or folders) into the page cache with `threads` threads, in order, stopping at
    `budget` bytes (default: a share of the memory available now). Runs in the background from construction;
    `wait` blocks until it is done and returns what it read."""

    def __init__(self, paths: Iterable[Path], threads: int = 8, budget: int | None = None) -> None:
        self.budget = int(AVAILABLE_SHARE * available_memory()) if budget is None else budget
        self.files: list[Path] = []  # what is read, in order
        self.bytes_read = 0
        self.skipped = 0  # files left out: past the budget, or unreadable
        self.seconds: float | None = None
        self._tasks: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._started = time.perf_counter()
        planned = 0
        for file in files_under(Path(p) for p in paths):
            try:
                size = file.stat().st_size
            except OSError:
                continue
            if planned + size > self.budget:
                self.skipped += 1
                continue
            planned += size
            self.files.append(file)
            for offset in range(0, size, CHUNK):
                self._tasks.put((file, offset, min(CHUNK, size - offset)))
        self.planned = planned
        self._threads = [threading.Thread(target=self._work, name=f"read-ahead-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for thread in self._threads:
            self._tasks.put(None)
            thread.start()
        threading.Thread(target=self._finish, name="read-ahead", daemon=True).start()

    def _work(self) -> None:
        buffer = bytearray(BUFFER)
        while (task := self._tasks.get()) is not None:
            file, offset, length = task
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                continue
            try:
                end = offset + length
                while offset < end:
                    view = memoryview(buffer)[:min(BUFFER, end - offset)]
                    got = os.preadv(fd, [view], offset)
                    if got <= 0:
                        break
                    offset += got
                    with self._lock:
                        self.bytes_read += got
            except OSError:
                pass
            finally:
                os.close(fd)

    def _finish(self) -> None:
        for thread in self._threads:
            thread.join()
        self.seconds = time.perf_counter() - self._started
        log.info("read ahead %d files, %.2f GB in %.1f s (%d left out)", len(self.files), self.bytes_read / 1e9,
                 self.seconds, self.skipped)
        self._done.set()

    def wait(self, timeout: float | None = None) -> dict:
        """Wait up to `timeout` seconds; what was read so far (``done``: whether it finished)."""
        self._done.wait(timeout)
        return {"done": self._done.is_set(), "files": len(self.files), "bytes": self.bytes_read,
                "planned_bytes": self.planned, "skipped_files": self.skipped,
                "seconds": None if self.seconds is None else round(self.seconds, 2)}


def checkpoint_order(folder: Path, lora_files: Iterable[str] = ()) -> list[Path]:
    """The files of a checkpoint `folder` in the order a starting service waits on them: the transformer and
    the LoRA files (the DiT's load is the longest), then the text encoder, the VAE and the rest.
    `lora_files`: further LoRAs, absolute or relative to `folder` (``s3://`` ones are skipped)."""
    loras = [Path(p) if Path(p).is_absolute() else folder / p for p in lora_files if not p.startswith("s3://")]
    top = sorted(p for p in folder.iterdir() if p.is_file())
    return [folder / "transformer", *top, *loras, folder / "text_encoder", folder / "vae", folder]
