"""Which hash for checkpoint manifests, and what verification costs (docs/reliability.md).

Measures, on this machine:

1. hash throughput in memory (256 MiB buffer, 8 MiB updates) for xxh3-128, xxh3-64, xxh64, crc32,
   sha1, sha256, blake2b (and blake3 when installed): the hash alone, no I/O;
2. on a file of ``--size_mb`` MiB (default 1024) in the page cache (read once before timing):
   a plain read of the file (the floor any check pays), and :func:`preftune.integrity.file_digest`
   (what ``preftune verify``, resume and every reader pay per byte);
3. the same file freshly written and fsynced, as a checkpoint save would leave it, through
   :func:`preftune.saving.mark_checkpoint_complete` (fsync + hash + marker).

Usage::

    flock /tmp/preftune-heavy.lock python benchmarks/bench_hash.py [--size_mb 1024] [--dir /tmp]

Numbers depend on the disk and on how busy the machine is; the median of ``--repeats`` runs is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def memory_throughput(repeats: int) -> dict[str, float]:
    """GB/s of each hash over a 256 MiB random buffer, fed in 8 MiB pieces."""
    import xxhash

    buf = memoryview(os.urandom(256 << 20))
    pieces = [buf[i:i + (8 << 20)] for i in range(0, len(buf), 8 << 20)]
    makers = {"xxh3_128": xxhash.xxh3_128, "xxh3_64": xxhash.xxh3_64, "xxh64": xxhash.xxh64,
              "sha1": hashlib.sha1, "sha256": hashlib.sha256, "blake2b": hashlib.blake2b}
    try:
        import blake3

        makers["blake3"] = blake3.blake3
    except ImportError:
        pass

    def run(make):
        h = make()
        for p in pieces:
            h.update(p)
        h.digest()

    def crc():
        c = 0
        for p in pieces:
            c = zlib.crc32(p, c)

    out = {name: len(buf) / _median_seconds(lambda m=make: run(m), repeats) / 1e9 for name, make in makers.items()}
    out["crc32 (zlib)"] = len(buf) / _median_seconds(crc, repeats) / 1e9
    return out


def file_costs(folder: Path, size_mb: int, repeats: int) -> dict[str, float]:
    from preftune.integrity import file_digest
    from preftune.saving import mark_checkpoint_complete

    ckpt = folder / "checkpoint-1"
    ckpt.mkdir()
    path = ckpt / "model.safetensors"
    chunk = os.urandom(64 << 20)
    with open(path, "wb") as f:
        for _ in range(size_mb // 64):
            f.write(chunk)
    (ckpt / "trainer_state.json").write_text("{}")
    size = path.stat().st_size

    def plain_read():
        buf = bytearray(8 << 20)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    plain_read()  # into the page cache
    read_s = _median_seconds(plain_read, repeats)
    digest_s = _median_seconds(lambda: file_digest(path), repeats)
    mark_s = _median_seconds(lambda: mark_checkpoint_complete(ckpt, 1), repeats)
    return {"file_bytes": size, "read_s": read_s, "digest_s": digest_s, "mark_s": mark_s,
            "read_GBps": size / read_s / 1e9, "digest_GBps": size / digest_s / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size_mb", type=int, default=1024, help="size of the test file in MiB (multiple of 64; default 1024)")
    parser.add_argument("--dir", default=None, help="where to write the test file (default: the system temp folder)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is kept (default 3)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    if args.size_mb < 64 or args.size_mb % 64:
        parser.error("--size_mb must be a multiple of 64, at least 64")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    folder = Path(tempfile.mkdtemp(prefix="preftune-bench-hash-", dir=args.dir))
    try:
        mem = memory_throughput(args.repeats)
        files = file_costs(folder, args.size_mb, args.repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("| hash | GB/s in memory |\n| --- | --- |")
    for name, gbps in sorted(mem.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {gbps:.2f} |")
    gib = files["file_bytes"] / 2**30
    print(f"\n{gib:.2f} GiB file in the page cache: plain read {files['read_s']:.2f} s ({files['read_GBps']:.2f} GB/s), "
          f"file_digest (xxh3-128) {files['digest_s']:.2f} s ({files['digest_GBps']:.2f} GB/s), "
          f"mark_checkpoint_complete (fsync + hash + marker) {files['mark_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"memory_GBps": mem, **files}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
