"""Keep the TLS layer's read buffers on glibc's heap instead of a fresh mapping per record.

uvloop's TLS transport (and asyncio's, which is a port of it) decrypts every record into a new
256 KiB bytes object, then shrinks it to the record's size. Terminal and database server
connections no longer use it (proxy.tlstransport, where OpenSSL reads a record at a time itself);
TLS connections of libraries on the proxy's event loop do (redis-py's for a ``rediss://`` URL). glibc
serves an allocation that large with mmap, the shrink with mremap and the free with munmap:
three system calls, page faults and TLB flushes per record received: half of a bare uvloop TLS
echo server's CPU on our 2-core machines (`perf`). glibc raises its thresholds by itself once a
process frees a large mapped block, and the proxy's start-up happens to do that today (`strace`
under load shows no mmap), but whether it does depends on what start-up reads and imports. Set
here, the buffer comes from the heap and goes back to it, and the heap keeps a few MiB free at
its top instead of trimming after each record: `bench/tls_read_cost.py --modes default tuned`
measured 27.8 -> 13.8 us of server CPU per TLS round trip.
"""

from __future__ import annotations

import ctypes
import platform
from typing import Final

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

# Above uvloop's 256 KiB read size plus the bytes object's header; larger allocations (a big
# result being buffered) still get their own mapping.
MMAP_THRESHOLD: Final = 512 * 1024
# Free memory the heap keeps at its top: several read buffers' worth, so that freeing one does
# not hand the pages back to the kernel only for the next record to fault them in again.
TRIM_THRESHOLD: Final = 4 * 1024 * 1024


def keep_read_buffers_on_heap() -> bool:
    """Set glibc's mmap and trim thresholds for this process; False where that cannot be done."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a static build need not export it: run with the defaults
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 when it took the value; setting either also stops glibc's own
    # adjustment of both, which is what lets the trim threshold stay where it is put.
    mapped = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trimmed = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mapped and trimmed)
