"""Random 64-bit words for LoRA dropout on CPU, from a small compiled counter-based generator.

PyTorch's CPU generator (mt19937) is serial: the dropout lanes of fc2's input at CLIP-L batch 8
(4.7M words) took 16 ms, 5 % of a bf16 training step of the plain FFN, and splitting the draw over a
helper thread gained nothing inside a training step (README, "MoLE against the plain FFN"). A
counter-based generator has no serial state: word ``w`` of a draw is SplitMix64's output for the state
``seed + (w + 1) * 0x9E3779B97F4A7C15`` (Steele, Lea & Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014; it passes BigCrush), so the words are computed in parallel, in SIMD lanes
and on every OpenMP thread (draws of 64K words and more): about 1 ms for the same 4.7M words with 2
threads and AVX-512 (1.4 ms with 1; 2.4 ms built for generic x86-64). The seed of each draw is one 64-bit number from PyTorch's default generator, so
``torch.manual_seed`` still fixes the lanes; the lanes do not depend on the thread count.

The C source below is compiled once per machine with the system C compiler (``cc``, what pip uses for
packages with C code; the machine's own CPU flags, ``-march=native``, are part of the cache key) into
``$MOVEKD_CACHE/native/`` and loaded with ctypes; it links OpenMP, which resolves to the ``libgomp``
PyTorch has already loaded, so both share one thread pool. Without a compiler, or with
``MOVEKD_NATIVE_RNG=0``, ``fill_random_words`` returns False and the caller draws from mt19937 (other
lanes for the same seed, the same distribution). In a process forked from the one that imported this
module the fill runs on one thread (libgomp cannot start threads after such a fork: it hangs).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (the golden ratio in 64 bits)

_SOURCE = r"""
#include <stdint.h>

/* SplitMix64 (Steele, Lea & Flood 2014): word w of a draw is the output for state seed + (w + 1) * gamma. */
void movekd_splitmix64_fill(uint64_t *dst, int64_t n, uint64_t seed, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(n >= 65536)
    for (int64_t w = 0; w < n; w++) {
        uint64_t z = seed + (uint64_t)(w + 1) * 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        dst[w] = z ^ (z >> 31);
    }
}
"""

# Tried in order: tuned for this CPU, then generic (a compiler without -march=native support), then
# without OpenMP (a compiler without it, e.g. clang without libomp: one thread, the pragma ignored).
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])
_UNSET = object()
_library = _UNSET
# libgomp cannot start threads in a process forked after its parent used them (it hangs; PyTorch's own
# parallel ops do the same): a forked child fills on its own thread only.
_IMPORTED_IN = os.getpid()


def _cpu_key() -> str:
    """What the compiled code depends on: architecture and the CPU's feature flags (-march=native)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {flags.strip()}"


def _compile(folder: Path) -> Path | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: LoRA dropout draws its lanes from PyTorch's generator")
        return None
    for flags in _FLAG_SETS:
        key = hashlib.sha256("\n".join([_SOURCE, compiler, *flags, _cpu_key()]).encode()).hexdigest()[:16]
        target = folder / f"splitmix64-{key}.so"
        if target.exists():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            source, built = Path(tmp) / "splitmix64.c", Path(tmp) / "splitmix64.so"
            source.write_text(_SOURCE)
            done = subprocess.run([compiler, *flags, "-shared", "-fPIC", str(source), "-o", str(built)],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(built, target)  # atomic: concurrent processes each build, one file wins
                return target
            log.info("compiling the dropout generator with %s failed: %s", " ".join(flags), done.stderr.strip()[:500])
    return None


def _load():
    """The compiled library (built on first use), or None where it cannot be built or is switched off."""
    global _library
    if _library is _UNSET:
        _library = None
        if os.environ.get("MOVEKD_NATIVE_RNG", "1") != "0":
            from movekd.assets.cache import cache_dir

            try:
                path = _compile(cache_dir() / "native")
                if path is not None:
                    library = ctypes.CDLL(str(path))
                    library.movekd_splitmix64_fill.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int]
                    library.movekd_splitmix64_fill.restype = None
                    _library = library
            except OSError as error:  # unwritable cache, a library the loader rejects
                log.info("native dropout generator unavailable (%s): using PyTorch's generator", error)
    return _library


def available() -> bool:
    """Whether ``fill_random_words`` uses the compiled generator in this process."""
    return _load() is not None


def fill_random_words(words: Tensor) -> bool:
    """Fill a contiguous int64 CPU tensor with SplitMix64 words seeded from PyTorch's default
    generator; False (``words`` untouched) where the compiled generator is unavailable."""
    library = _load()
    if library is None or words.device.type != "cpu" or words.dtype != torch.int64 or not words.is_contiguous():
        return False
    threads = torch.get_num_threads() if os.getpid() == _IMPORTED_IN else 1
    library.movekd_splitmix64_fill(words.data_ptr(), words.numel(), draw_seed(), threads)
    return True


def draw_seed() -> int:
    """One unsigned 64-bit seed from PyTorch's default CPU generator."""
    return int(torch.empty((), dtype=torch.int64).random_(-(2**63), None)) & (2**64 - 1)


def splitmix64_words(seed: int, count: int) -> list[int]:
    """The first ``count`` words for ``seed`` in pure Python: the reference the tests hold the C to."""
    mask, out = 2**64 - 1, []
    for w in range(count):
        z = (seed + (w + 1) * GAMMA) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out
