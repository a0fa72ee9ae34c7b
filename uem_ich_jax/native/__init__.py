"""CPU kernels in C++, compiled on first use and called through XLA's FFI.

`depthwise.cc` has the depthwise convolution and its kernel gradient for
NHWC float32 maps, and the per-channel sum of squares over each map that GRN
takes. The first call of `kernels_ready()` in a process builds it
with the system's C++ compiler (`$CXX`, else g++, c++ or clang++) for this CPU
(-march=native), against the FFI headers that jaxlib ships, and keeps the
library in a per-user cache: `$UEM_ICH_NATIVE_CACHE`, else
`$XDG_CACHE_HOME/uem_ich_jax/native`, else `~/.cache/uem_ich_jax/native`. The
file name hashes the source, the compiler command, jaxlib's version and the
CPU's model and feature flags, so a cache shared by different machines never
hands one of them code for another CPU. Building takes about 6 s on 2 cores.

Where no compiler is found or the build fails, `kernels_ready()` logs why
once and returns False, and `layers.depthwise_conv` falls back to the shifted
sum written in JAX.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile

import jax
import jaxlib

logger = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("depthwise.cc")
CACHE_VARIABLE = "UEM_ICH_NATIVE_CACHE"
FORWARD_TARGET = "uem_ich_depthwise_forward"
KERNEL_GRADIENT_TARGET = "uem_ich_depthwise_kernel_gradient"
SUM_OF_SQUARES_TARGET = "uem_ich_spatial_sum_of_squares"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_BUILD_TIMEOUT_SECONDS = 600


class NativeBuildError(RuntimeError):
  """The C++ kernels could not be built or loaded on this machine."""


def cache_dir() -> pathlib.Path:
  """Return the folder of the built libraries."""
  if os.environ.get(CACHE_VARIABLE):
    return pathlib.Path(os.environ[CACHE_VARIABLE])
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "uem_ich_jax" / "native"


def _compiler() -> str:
  """Return `$CXX` (a wrapper such as "ccache g++" is fine), else the first compiler found."""
  chosen = os.environ.get("CXX", "").strip()
  if chosen:
    words = shlex.split(chosen)
    if not shutil.which(words[0]):
      raise NativeBuildError(f"$CXX is {chosen!r}, but {words[0]!r} is not an executable")
    return chosen
  for name in ("g++", "c++", "clang++"):
    if shutil.which(name):
      return shutil.which(name)
  raise NativeBuildError("no C++ compiler found ($CXX, g++, c++ or clang++)")


def _cpu_description() -> str:
  """Return the CPU's model and feature flags, as far as /proc/cpuinfo lists them."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return f"{platform.machine()} {platform.processor()}"
  keys = ("model name", "flags", "Features", "CPU part")
  seen = {}
  for line in lines:
    key, _, value = line.partition(":")
    key = key.strip()
    if key in keys and key not in seen:
      seen[key] = value.strip()
  return repr(sorted(seen.items()))


def _build_command(compiler: str, output: pathlib.Path) -> list[str]:
  return [
      *shlex.split(compiler), *_FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE),
      "-o", str(output),
  ]


def library_path(compiler: str) -> pathlib.Path:
  """Return where the library built by `compiler` for this CPU and jaxlib lives."""
  key = hashlib.sha256()
  key.update(SOURCE.read_bytes())
  key.update(" ".join(_build_command(compiler, pathlib.Path("out"))).encode())
  key.update(jaxlib.__version__.encode())
  key.update(_cpu_description().encode())
  return cache_dir() / f"depthwise-{key.hexdigest()[:16]}.so"


def _checksum_path(library: pathlib.Path) -> pathlib.Path:
  return library.with_suffix(".sha256")


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(library: pathlib.Path) -> bool:
  """Return whether `library` has the checksum written after it was built.

  Loading a cut-short shared library can kill the process with SIGBUS, which
  no exception catches, so the file is checked before it is loaded.
  """
  try:
    return _checksum_path(library).read_text().strip() == _sha256(library)
  except OSError:
    return False


def _write_durably(path: pathlib.Path, data: bytes) -> None:
  """Write `data` to `path` through a temporary file in the same folder, synced, then renamed."""
  descriptor, temporary = tempfile.mkstemp(dir=path.parent)
  try:
    with os.fdopen(descriptor, "wb") as file:
      file.write(data)
      file.flush()
      os.fsync(file.fileno())
    os.chmod(temporary, 0o755)
    os.replace(temporary, path)
  finally:
    pathlib.Path(temporary).unlink(missing_ok=True)


def build(compiler: str) -> pathlib.Path:
  """Compile `depthwise.cc` into the cache unless an intact copy is there; return its path.

  The compiler writes into a private temporary folder. The library is then
  copied into the cache under a temporary name, synced and renamed, and its
  checksum written beside it, so processes that build at the same time never
  load a half-written library. Others may read the library (mode 755).
  """
  target = library_path(compiler)
  if target.exists() and _intact(target):
    return target
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
      output = pathlib.Path(scratch) / target.name
      command = _build_command(compiler, output)
      logger.info("building the CPU depthwise kernels: %s", " ".join(command))
      try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_SECONDS, check=False
        )
      except subprocess.TimeoutExpired as error:
        raise NativeBuildError(
            f"{' '.join(command)} timed out after {_BUILD_TIMEOUT_SECONDS} s"
        ) from error
      except OSError as error:
        raise NativeBuildError(f"failed to start {command[0]}: {error}") from error
      if result.returncode != 0 or not output.is_file():
        raise NativeBuildError(
            f"{' '.join(command)} failed with exit code {result.returncode}:\n{result.stderr[-4000:]}"
        )
      data = output.read_bytes()
      _write_durably(target, data)
      _write_durably(_checksum_path(target), hashlib.sha256(data).hexdigest().encode())
  except OSError as error:
    raise NativeBuildError(
        f"failed to write to the cache folder {target.parent} ({error}); set {CACHE_VARIABLE} to a"
        " writable folder"
    ) from error
  return target


def open_library(compiler: str) -> ctypes.CDLL:
  """Build the library unless an intact copy is cached, and load it.

  Raises NativeBuildError when either fails.
  """
  path = build(compiler)
  try:
    return ctypes.cdll.LoadLibrary(str(path))
  except OSError as error:
    raise NativeBuildError(f"could not load the built library {path}: {error}") from error


@functools.cache
def _load() -> None:
  """Load the kernels and register them with XLA, once per process.

  XLA rejects a second registration of a name from another library, so this
  must run once only.
  """
  library = open_library(_compiler())
  try:
    symbols = {
        FORWARD_TARGET: library.UemIchDepthwiseForward,
        KERNEL_GRADIENT_TARGET: library.UemIchDepthwiseKernelGradient,
        SUM_OF_SQUARES_TARGET: library.UemIchSpatialSumOfSquares,
    }
  except AttributeError as error:
    raise NativeBuildError(f"the built library is missing a kernel symbol: {error}") from error
  for target, symbol in symbols.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")


def ensure_kernels() -> None:
  """Make the kernels callable in this process, or raise NativeBuildError with the reason."""
  _load()


@functools.cache
def kernels_ready() -> bool:
  """Return whether the kernels are callable here; log the reason once when they are not."""
  try:
    _load()
  except Exception as error:  # pylint: disable=broad-exception-caught
    # Any failure leaves the JAX forms usable, so log the reason and continue.
    logger.warning(
        "the C++ CPU kernels are unavailable, so depthwise convolutions use the slower"
        " shifted sum in JAX and GRN uses jnp.sum: %s",
        error,
    )
    return False
  return True


def depthwise_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Convolve NHWC float32 `x` with a (k, k, C) kernel, SAME padding, no bias. k must be odd."""
  call = jax.ffi.ffi_call(
      FORWARD_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential"
  )
  return call(x, kernel)


def depthwise_kernel_gradient(x: jax.Array, grad: jax.Array, size: int) -> jax.Array:
  """Return the (size, size, C) kernel gradient from the input `x` and the output gradient."""
  call = jax.ffi.ffi_call(
      KERNEL_GRADIENT_TARGET,
      jax.ShapeDtypeStruct((size, size, x.shape[-1]), x.dtype),
      vmap_method="sequential",
  )
  return call(x, grad)



def spatial_sum_of_squares(x: jax.Array) -> jax.Array:
  """Return the (N, C) sums over rows and columns of the squares of NHWC float32 `x`."""
  call = jax.ffi.ffi_call(
      SUM_OF_SQUARES_TARGET,
      jax.ShapeDtypeStruct((x.shape[0], x.shape[-1]), x.dtype),
      vmap_method="sequential",
  )
  return call(x)
