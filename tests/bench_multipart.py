"""Throughput and memory of jobd.read_multipart on one big part.

Run: python3 tests/bench_multipart.py [MiB] ; prints MB/s to a null sink and to a real file,
and the peak of Python allocations (tracemalloc) while streaming, which must stay flat.
"""

import os
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jobd  # noqa: E402

BOUNDARY = b"0123456789abcdef-0123456789abcdef-0123456789abcdef-0123456789abcdef"


class SyntheticBody:
    """A multipart body of one `size`-byte part, produced on the fly (never held whole)."""

    def __init__(self, size, block=1 << 20):
        self.head = (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"big.bin\";"
                     b" filename=\"big.bin\"\r\n\r\n")
        self.tail = b"\r\n--" + BOUNDARY + b"--\r\n"
        # Data full of near-boundaries: "\r\n--0123..." prefixes, the worst case for the scan.
        pattern = (b"\r\n--" + BOUNDARY[:40] + b"x" * 200)
        self.block = (pattern * (block // len(pattern) + 1))[:block]
        self.left = size
        self.stage = 0

    def read(self, n):
        if self.stage == 0:
            self.stage = 1
            return self.head
        if self.left > 0:
            chunk = self.block[:min(n, self.left)]
            self.left -= len(chunk)
            return chunk
        if self.stage == 1:
            self.stage = 2
            return self.tail
        return b""


class NullSink:
    written = 0

    def write(self, data):
        self.written += len(data)
        return len(data)

    def close(self):
        pass


def run(size, sink_factory, trace=False):
    body = SyntheticBody(size)
    sinks = []

    def open_part(headers, name, filename):
        sinks.append(sink_factory())
        return sinks[-1]

    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    parts = jobd.read_multipart(body, BOUNDARY, open_part)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] if trace else None
    if trace:
        tracemalloc.stop()
    assert parts == 1
    return elapsed, peak


def main():
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    size = mib << 20
    elapsed, _ = run(size, NullSink)
    print(f"{mib} MiB part -> null sink: {size / elapsed / 1e6:.0f} MB/s")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.bin")
        elapsed, _ = run(size, lambda: open(path, "wb"))
        assert os.path.getsize(path) == size
        print(f"{mib} MiB part -> file on disk: {size / elapsed / 1e6:.0f} MB/s")
    _, peak = run(size, NullSink, trace=True)
    print(f"peak Python allocations while streaming {mib} MiB: {peak / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
