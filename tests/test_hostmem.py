"""hostmem.keep_freed_memory: glibc's malloc keeps freed memory mapped (command lines only)."""

import resource
import subprocess
import sys
import textwrap

from dspt_jax import hostmem


def test_a_malloc_variable_in_the_environment_wins():
    assert hostmem.keep_freed_memory({"MALLOC_TOP_PAD_": "0"}) is False


def test_freed_memory_is_not_faulted_in_again():
    """A worker thread that allocates, touches and frees six 16 MiB blocks per round, as XLA:CPU's threads do
    with a step's buffers: with glibc's defaults the thread's arena hands the memory back after each round
    and every round faults its pages in again; with the settings only the first round does. In subprocesses:
    the settings are process-wide, and the test process keeps its own."""
    script = textwrap.dedent(
        """
        import ctypes, ctypes.util, resource, sys, threading
        from dspt_jax import hostmem
        applied = hostmem.keep_freed_memory({}) if sys.argv[1] == "keep" else False
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
        libc.free.argtypes = (ctypes.c_void_p,)

        def rounds():
            for _ in range(10):
                blocks = [libc.malloc(16 << 20) for _ in range(6)]
                for p in blocks:
                    ctypes.memset(p, 1, 16 << 20)
                for p in blocks:
                    libc.free(p)

        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        worker = threading.Thread(target=rounds)
        worker.start()
        worker.join()
        print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        """
    )

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        applied, count = out.stdout.split()
        return applied == "True", int(count)

    pages = 10 * 6 * (16 << 20) // resource.getpagesize()
    default_applied, default = faults("default")
    applied, kept = faults("keep")
    assert not default_applied and applied
    assert default > 0.5 * pages, (default, pages)  # glibc's defaults: the pages come back round after round
    assert kept < 0.15 * pages, (kept, pages)  # the first round's pages (1/10), then (almost) none
