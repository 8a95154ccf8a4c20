"""Why the shard writer copies with two threads: one vs two kernel copies in flight, against ``cp``.

Copies FILE (e.g. one shard of the ``convert_large.py`` checkpoint) into a sibling folder with
``copy_file_range`` in 64 MiB pieces, from one thread and from two, and with ``cp``, alternating for
``--repeats`` rounds so the three see the same disk. Prints the median time of each and the ratios.

    python benchmarks/copy_threads.py FILE [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

PIECE = 64 * 2**20


def kernel_copy(source: Path, destination: Path, threads: int) -> None:
    size = source.stat().st_size
    pieces = [(start, min(PIECE, size - start)) for start in range(0, size, PIECE)]
    lock = threading.Lock()
    reader = os.open(source, os.O_RDONLY)
    writer = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(writer, size)

    def work() -> None:
        while True:
            with lock:
                if not pieces:
                    return
                offset, length = pieces.pop(0)
            while length:
                done = os.copy_file_range(reader, writer, length, offset, offset)
                offset, length = offset + done, length - done

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    os.close(reader)
    os.close(writer)


def timed(action: object) -> float:
    os.sync()
    start = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="normswap-copy-", dir=args.file.parent))
    target = work / args.file.name
    times: dict[str, list[float]] = {"one thread": [], "two threads": [], "cp": []}
    try:
        for _ in range(args.repeats):
            for label, action in (("one thread", lambda: kernel_copy(args.file, target, 1)),
                                  ("two threads", lambda: kernel_copy(args.file, target, 2)),
                                  ("cp", lambda: subprocess.run(["cp", str(args.file), str(target)], check=True))):
                times[label].append(timed(action))
                target.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = args.file.stat().st_size / 1e9
    medians = {label: statistics.median(values) for label, values in times.items()}
    for label, value in medians.items():
        runs = ", ".join(f"{t:.2f}" for t in times[label])
        print(f"{label:12} {value:6.2f} s  ({size / value:.2f} GB/s)  runs: {runs}")
    print(f"two threads / one thread: {medians['two threads'] / medians['one thread']:.2f}; "
          f"two threads / cp: {medians['two threads'] / medians['cp']:.2f}")


if __name__ == "__main__":
    main()
