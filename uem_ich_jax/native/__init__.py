"""CPU kernels in C++, compiled on first use and called through XLA's FFI.

`depthwise.cc` has the depthwise convolution and its kernel gradient for
NHWC float32 maps. The first call of `depthwise_ready()` in a process builds it
with the system's C++ compiler (`$CXX`, else g++, c++ or clang++) for this CPU
(-march=native), against the FFI headers that jaxlib ships, and keeps the
library in a per-user cache: `$UEM_ICH_NATIVE_CACHE`, else
`$XDG_CACHE_HOME/uem_ich_jax/native`, else `~/.cache/uem_ich_jax/native`. The
file name hashes the source, the compiler command, jaxlib's version and the
CPU's model and feature flags, so a cache shared by different machines never
hands one of them code for another CPU. Building takes about 6 s on 2 cores.

Where no compiler is found or the build fails, `depthwise_ready()` logs why
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
  for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    if name and shutil.which(name):
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
  return [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", str(output)]


def library_path(compiler: str) -> pathlib.Path:
  """Return where the library built by `compiler` for this CPU and jaxlib lives."""
  key = hashlib.sha256()
  key.update(SOURCE.read_bytes())
  key.update(" ".join(_build_command(compiler, pathlib.Path("out"))).encode())
  key.update(jaxlib.__version__.encode())
  key.update(_cpu_description().encode())
  return cache_dir() / f"depthwise-{key.hexdigest()[:16]}.so"


def build(compiler: str) -> pathlib.Path:
  """Compile `depthwise.cc` into the cache unless it is there already; return the library's path.

  The compiler writes a temporary file that is then renamed, so processes that
  build at the same time never load a half-written library.
  """
  target = library_path(compiler)
  if target.exists():
    return target
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
  except OSError as error:
    raise NativeBuildError(
        f"cannot write to the cache folder {target.parent} ({error}); set {CACHE_VARIABLE} to a"
        " writable folder"
    ) from error
  os.close(descriptor)
  temporary = pathlib.Path(temporary)
  command = _build_command(compiler, temporary)
  logger.info("building the CPU depthwise kernels: %s", " ".join(command))
  try:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_SECONDS, check=False
    )
    if result.returncode != 0:
      raise NativeBuildError(
          f"{' '.join(command)} exited with {result.returncode}:\n{result.stderr[-4000:]}"
      )
    os.replace(temporary, target)
  except subprocess.TimeoutExpired as error:
    raise NativeBuildError(f"{' '.join(command)} ran over {_BUILD_TIMEOUT_SECONDS} s") from error
  finally:
    temporary.unlink(missing_ok=True)
  return target


def open_library(compiler: str) -> ctypes.CDLL:
  """Build the library unless it is cached, and load it; raise NativeBuildError on failure."""
  path = build(compiler)
  try:
    return ctypes.cdll.LoadLibrary(str(path))
  except OSError:
    # A cached file that does not load (cut short by a full disk, say) is
    # built again once.
    logger.warning("the cached library %s does not load; building it again", path)
    path.unlink(missing_ok=True)
  try:
    return ctypes.cdll.LoadLibrary(str(build(compiler)))
  except OSError as error:
    raise NativeBuildError(f"could not load the built library: {error}") from error


@functools.cache
def _load() -> None:
  """Load the kernels and register them with XLA, once per process.

  XLA refuses a second registration of a name from another library, so this
  must run once only.
  """
  library = open_library(_compiler())
  for target, symbol in (
      (FORWARD_TARGET, library.UemIchDepthwiseForward),
      (KERNEL_GRADIENT_TARGET, library.UemIchDepthwiseKernelGradient),
  ):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")


def ensure_depthwise() -> None:
  """Make the kernels callable in this process, or raise NativeBuildError saying why not."""
  _load()


@functools.cache
def depthwise_ready() -> bool:
  """Return whether the kernels are callable here; log the reason once when they are not."""
  try:
    _load()
  except NativeBuildError as error:
    logger.warning(
        "the C++ depthwise kernels are unavailable, so CPU depthwise convolutions use the"
        " slower shifted sum in JAX: %s",
        error,
    )
    return False
  return True


def depthwise_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Convolve NHWC float32 `x` with a (k, k, C) kernel, SAME padding, no bias; k odd."""
  call = jax.ffi.ffi_call(
      FORWARD_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential"
  )
  return call(x, kernel)


def depthwise_kernel_gradient(x: jax.Array, grad: jax.Array, size: int) -> jax.Array:
  """Return the (size, size, C) gradient of the kernel from the input `x` and the output gradient."""
  call = jax.ffi.ffi_call(
      KERNEL_GRADIENT_TARGET,
      jax.ShapeDtypeStruct((size, size, x.shape[-1]), x.dtype),
      vmap_method="sequential",
  )
  return call(x, grad)

