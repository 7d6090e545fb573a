"""proxy.allocator: a TLS record's 256 KiB read buffer comes from the heap, and freeing it keeps the heap.

Each case runs in a fresh interpreter: glibc's thresholds are process-wide and move by themselves
(a large block freed raises them), so only a new process shows what the defaults would do.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")

# The size uvloop's TLS layer asks for on every record it decrypts.
_PROBE = textwrap.dedent(
    """
    import sys
    from proxy import allocator

    def heap_end():
        for line in open("/proc/self/maps"):
            if line.rstrip().endswith("[heap]"):
                return int(line.split()[0].split("-")[1], 16)
        return 0

    def region(address):
        for line in open("/proc/self/maps"):
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 else "anonymous mapping"
        return "unmapped"

    def probe():
        buffers = [bytes(256 * 1024 + 64) for _ in range(3)]
        print(*sorted({region(id(b)) for b in buffers}))
        grown = heap_end()
        del buffers
        print(heap_end() == grown)

    if sys.argv[1] == "tuned":
        assert allocator.keep_read_buffers_on_heap()
    if sys.argv[1] == "event loop":
        from proxy import eventloop

        async def main():
            probe()

        eventloop.run(main())
    else:
        probe()
    """
)


def _run(mode: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout.split("\n")


def test_untuned_process_maps_each_read_buffer_separately() -> None:
    """The control: without the call, glibc gives a fresh interpreter a mapping per buffer."""
    placement, _kept = _run("default")[:2]
    assert placement == "anonymous mapping"


@pytest.mark.parametrize("mode", ["tuned", "event loop"])
def test_tuned_process_serves_read_buffers_from_the_heap_and_keeps_it(mode: str) -> None:
    """Set directly, or by the proxy's event loop runner before anything runs on the loop."""
    placement, kept = _run(mode)[:2]
    assert placement == "[heap]"
    # Freed buffers stay with the heap for the next record instead of going back to the kernel.
    assert kept == "True"
