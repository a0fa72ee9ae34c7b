"""Building, caching and loading the C++ CPU kernels of `uem_ich_jax.native`."""

import logging
import pathlib
import shutil
import stat

import pytest

from uem_ich_jax import native


def test_kernels_build_with_compiler():
  if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
    pytest.skip("no C++ compiler on this machine; layers use the shifted sum instead")
  native.ensure_kernels()
  assert native.kernels_ready()
  assert native.library_path(native._compiler()).is_file()


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(native.CACHE_VARIABLE, str(tmp_path / "mine"))
  assert native.cache_dir() == tmp_path / "mine"
  monkeypatch.delenv(native.CACHE_VARIABLE)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert native.cache_dir() == tmp_path / "xdg" / "uem_ich_jax" / "native"


def test_library_path_depends_on_cpu(monkeypatch):
  # A cache shared between machines must not give one of them code built for another.
  monkeypatch.setattr(native, "_cpu_description", lambda: "model A, flags avx2")
  first = native.library_path("/usr/bin/g++")
  assert native.library_path("/usr/bin/g++") == first
  monkeypatch.setattr(native, "_cpu_description", lambda: "model B, flags avx512f")
  assert native.library_path("/usr/bin/g++") != first
  assert native.library_path("/usr/bin/clang++") != first


def _fake_compiler(folder: pathlib.Path, body: str) -> str:
  script = folder / "fake-c++"
  script.write_text(f"#!/bin/sh\n{body}\n")
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  return str(script)


def test_build_failure_cleans_up(monkeypatch, tmp_path):
  monkeypatch.setenv(native.CACHE_VARIABLE, str(tmp_path / "cache"))
  compiler = _fake_compiler(tmp_path, 'echo "depthwise.cc:1: error: no such header" >&2; exit 1')
  with pytest.raises(native.NativeBuildError, match="no such header"):
    native.build(compiler)
  assert list((tmp_path / "cache").iterdir()) == []


def test_build_reuses_cached_library(monkeypatch, tmp_path):
  monkeypatch.setenv(native.CACHE_VARIABLE, str(tmp_path / "cache"))
  log = tmp_path / "calls"
  # The fake compiler writes its output file, the argument after -o.
  body = f'echo call >> {log}; while [ "$1" != "-o" ]; do shift; done; echo built > "$2"'
  compiler = _fake_compiler(tmp_path, body)
  path = native.build(compiler)
  assert path.read_text() == "built\n"
  assert native.build(compiler) == path
  assert log.read_text().count("call") == 1


def test_kernels_ready_warns_once(monkeypatch, caplog):
  def fail():
    raise native.NativeBuildError("no C++ compiler found")

  monkeypatch.setattr(native, "_load", fail)
  native.kernels_ready.cache_clear()
  try:
    with caplog.at_level(logging.WARNING, logger="uem_ich_jax.native"):
      assert not native.kernels_ready()
      assert not native.kernels_ready()
    warnings = [record for record in caplog.records if "shifted sum" in record.getMessage()]
    assert len(warnings) == 1
    assert "no C++ compiler found" in warnings[0].getMessage()
  finally:
    native.kernels_ready.cache_clear()


def test_build_unwritable_cache_names_variable(monkeypatch, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  monkeypatch.setenv(native.CACHE_VARIABLE, str(blocker / "cache"))
  with pytest.raises(native.NativeBuildError, match=native.CACHE_VARIABLE):
    native.build(_fake_compiler(tmp_path, "exit 0"))


def test_build_replaces_truncated_library(monkeypatch, tmp_path):
  # Loading a truncated library can kill the process with SIGBUS, so a cached
  # file whose checksum does not match is built again before it is loaded.
  monkeypatch.setenv(native.CACHE_VARIABLE, str(tmp_path / "cache"))
  compiler = _fake_compiler(
      tmp_path, 'while [ "$1" != "-o" ]; do shift; done; printf "whole library" > "$2"'
  )
  path = native.build(compiler)
  path.write_bytes(b"whole li")
  assert native.build(compiler) == path
  assert path.read_bytes() == b"whole library"


def test_build_library_mode_755(monkeypatch, tmp_path):
  monkeypatch.setenv(native.CACHE_VARIABLE, str(tmp_path / "cache"))
  compiler = _fake_compiler(tmp_path, 'while [ "$1" != "-o" ]; do shift; done; echo built > "$2"')
  path = native.build(compiler)
  assert stat.S_IMODE(path.stat().st_mode) == 0o755


def test_compiler_accepts_cxx_wrapper(monkeypatch, tmp_path):
  compiler = _fake_compiler(tmp_path, "exit 0")
  monkeypatch.setenv("CXX", f"{compiler} --wrapped g++")
  assert native._compiler() == f"{compiler} --wrapped g++"
  command = native._build_command(native._compiler(), tmp_path / "out")
  assert command[:3] == [compiler, "--wrapped", "g++"]


def test_compiler_rejects_missing_cxx(monkeypatch):
  monkeypatch.setenv("CXX", "/no/such/g++")
  with pytest.raises(native.NativeBuildError, match="not an executable"):
    native._compiler()


def test_kernels_ready_catches_any_error(monkeypatch, caplog):
  def fail():
    raise AttributeError("undefined symbol: UemIchDepthwiseForward")

  monkeypatch.setattr(native, "_load", fail)
  native.kernels_ready.cache_clear()
  try:
    with caplog.at_level(logging.WARNING, logger="uem_ich_jax.native"):
      assert not native.kernels_ready()
    assert "undefined symbol" in caplog.text
  finally:
    native.kernels_ready.cache_clear()
