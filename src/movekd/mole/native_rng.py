"""LoRA dropout on CPU from a small compiled counter-based generator: random words, and masks applied
in one pass without storing them.

PyTorch's CPU generator (mt19937) is serial: the dropout lanes of fc2's input at CLIP-L batch 8
(4.7M words) took 16 ms, 5 % of a bf16 training step of the plain FFN, and splitting the draw over a
helper thread gained nothing inside a training step (README, "MoLE against the plain FFN"). A
counter-based generator has no serial state: word ``w`` of a draw is SplitMix64's output for the state
``seed + (w + 1) * 0x9E3779B97F4A7C15`` (Steele, Lea & Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014; it passes BigCrush), so the words are computed in parallel, in SIMD lanes
and on every OpenMP thread (draws of 64K words and more): about 1 ms for the same 4.7M words with 2
threads and AVX-512 (1.4 ms with 1; 2.4 ms built for generic x86-64). The seed of each draw is one
64-bit number from PyTorch's default generator, so ``torch.manual_seed`` still fixes the lanes; the
lanes do not depend on the thread count.

Because any word can be recomputed from its index, a mask need not be stored at all:
``apply_dropout`` derives each element's lane from the seed and zeroes the dropped elements in the
same pass (3.0 ms for fc2's input at CLIP-L batch 8 in bf16, against 7.6 ms for drawing lanes, making
the {0, 1} mask and multiplying; 0.7 ms against 8.1 ms when the backward masks the input gradient),
so the kernels keep a seed per call instead of 2 bytes per element.

The C source below is compiled once per machine with the system C compiler (``cc``, what pip uses for
packages with C code; the machine's own CPU flags, ``-march=native``, are part of the cache key) into
``$MOVEKD_CACHE/native/`` and loaded with ctypes; it links OpenMP, which resolves to the ``libgomp``
PyTorch has already loaded, so both share one thread pool. Without a compiler, or with
``MOVEKD_NATIVE_RNG=0``, ``fill_random_words`` returns False and ``apply_dropout`` None, and the caller
draws from mt19937 (other lanes for the same seed, the same distribution). In a process forked from
the one that imported this module the C code runs on one thread (libgomp cannot start threads after
such a fork: it hangs).
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
#include <string.h>

/* SplitMix64 (Steele, Lea & Flood 2014): word w of a draw is the output for state seed + (w + 1) * gamma. */
static inline uint64_t movekd_word(uint64_t seed, int64_t w) {
    uint64_t z = seed + (uint64_t)(w + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

void movekd_splitmix64_fill(uint64_t *dst, int64_t n, uint64_t seed, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(n >= 65536)
    for (int64_t w = 0; w < n; w++) dst[w] = movekd_word(seed, w);
}

/* Dropout in one pass: dst[e] = src[e] if lane e >= threshold, else 0 (every bit clear). Lane e is the
   signed 16-bit chunk e % 4, in memory order, of word e / 4: the words above viewed as int16, so the
   mask is the one movekd_splitmix64_fill's lanes give. Blocks of 8 words (32 lanes): the words in one
   vectorisable loop, the 32 elements in another. */
#define MOVEKD_DROPOUT(NAME, T) \
static void NAME(const T *src, T *dst, int64_t n, uint64_t seed, int16_t threshold, int threads) { \
    int64_t blocks = n / 32; \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(n >= 262144)") \
    for (int64_t b = 0; b < blocks; b++) { \
        uint64_t words[8]; \
        int16_t lanes[32]; \
        for (int k = 0; k < 8; k++) words[k] = movekd_word(seed, 8 * b + k); \
        memcpy(lanes, words, sizeof lanes); \
        for (int i = 0; i < 32; i++) dst[32 * b + i] = lanes[i] >= threshold ? src[32 * b + i] : (T)0; \
    } \
    for (int64_t e = 32 * blocks; e < n; e++) { \
        uint64_t word = movekd_word(seed, e / 4); \
        int16_t lane; \
        memcpy(&lane, (const char *)&word + 2 * (e % 4), sizeof lane); \
        dst[e] = lane >= threshold ? src[e] : (T)0; \
    } \
}
MOVEKD_DROPOUT(movekd_dropout16, uint16_t)
MOVEKD_DROPOUT(movekd_dropout32, uint32_t)
MOVEKD_DROPOUT(movekd_dropout64, uint64_t)

void movekd_dropout_apply(const void *src, void *dst, int64_t n, int bytes, uint64_t seed, int16_t threshold,
                          int threads) {
    if (bytes == 2) movekd_dropout16(src, dst, n, seed, threshold, threads);
    else if (bytes == 4) movekd_dropout32(src, dst, n, seed, threshold, threads);
    else if (bytes == 8) movekd_dropout64(src, dst, n, seed, threshold, threads);
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


def _compile(folder: Path) -> tuple[Path, list[str]] | None:
    """The built library and the flags it was built with (the first set that compiles)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: LoRA dropout draws its lanes from PyTorch's generator")
        return None
    for flags in _FLAG_SETS:
        key = hashlib.sha256("\n".join([_SOURCE, compiler, *flags, _cpu_key()]).encode()).hexdigest()[:16]
        target = folder / f"splitmix64-{key}.so"
        if target.exists():
            return target, flags
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            source, built = Path(tmp) / "splitmix64.c", Path(tmp) / "splitmix64.so"
            source.write_text(_SOURCE)
            done = subprocess.run([compiler, *flags, "-shared", "-fPIC", str(source), "-o", str(built)],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(built, target)  # atomic: concurrent processes each build, one file wins
                return target, flags
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
                built = _compile(cache_dir() / "native")
                if built is not None:
                    path, flags = built
                    library = ctypes.CDLL(str(path))
                    library.movekd_splitmix64_fill.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int]
                    library.movekd_splitmix64_fill.restype = None
                    library.movekd_dropout_apply.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                                             ctypes.c_uint64, ctypes.c_int16, ctypes.c_int]
                    library.movekd_dropout_apply.restype = None
                    # A generic build computes the words without 64-bit vector multiplies: its fused
                    # dropout measured slower (11 ms against 7.6 ms at CLIP-L fc2 batch 8, bf16) than
                    # its lanes masked by PyTorch, so only a build for this CPU fuses.
                    library.vectorised = "-march=native" in flags
                    _library = library
            except OSError as error:  # unwritable cache, a library the loader rejects
                log.info("native dropout generator unavailable (%s): using PyTorch's generator", error)
    return _library


def available() -> bool:
    """Whether ``fill_random_words`` uses the compiled generator in this process."""
    return _load() is not None


def _threads() -> int:
    return torch.get_num_threads() if os.getpid() == _IMPORTED_IN else 1


def fill_random_words(words: Tensor, seed: int) -> bool:
    """Fill a contiguous int64 CPU tensor with the SplitMix64 words of ``seed``; False (``words``
    untouched) where the compiled generator is unavailable."""
    library = _load()
    if library is None or words.device.type != "cpu" or words.dtype != torch.int64 or not words.is_contiguous():
        return False
    library.movekd_splitmix64_fill(words.data_ptr(), words.numel(), seed, _threads())
    return True


def apply_dropout(src: Tensor, seed: int, threshold: int, out: Tensor | None = None) -> Tensor | None:
    """``src`` with every entry whose lane is below ``threshold`` set to zero, in one pass, into
    ``out`` (``src`` itself is allowed) or a new tensor. Lane ``e`` is int16 ``e`` of
    ``fill_random_words(seed)``'s words, so the mask is the one those lanes give. None where the
    compiled generator is unavailable or generic (see ``_load``), or the tensors are not contiguous
    CPU tensors of 2-, 4- or 8-byte elements of one shape; the caller then masks with PyTorch."""
    library = _load()
    if (library is None or not getattr(library, "vectorised", False) or src.device.type != "cpu"
            or src.element_size() not in (2, 4, 8) or not src.is_contiguous()):
        return None
    if out is None:
        out = torch.empty_like(src, memory_format=torch.contiguous_format)
    elif out.shape != src.shape or out.dtype != src.dtype or out.device != src.device or not out.is_contiguous():
        return None
    library.movekd_dropout_apply(src.data_ptr(), out.data_ptr(), src.numel(), src.element_size(), seed,
                                 threshold, _threads())
    return out


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
