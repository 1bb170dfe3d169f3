"""Source rules of the CUDA kernels that only a GPU run could otherwise catch (as a rare race)."""
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess

import pytest

CUDA_DIR = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
CUDA_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
EMULATION = CUDA_DIR / "emulation"
KERNEL = re.compile(r"__global__\b.*?\b(\w+_kernel)\s*\((?:[^()]|\([^()]*\))*\)\s*\{\s*([^;]*;)", re.S)


def load_to_cpp():
    """The CPU emulation's translator of .cu sources (csrc/cuda/emulation/to_cpp.py)."""
    spec = importlib.util.spec_from_file_location("to_cpp", EMULATION / "to_cpp.py")
    to_cpp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(to_cpp)
    return to_cpp


def test_the_kernel_sources_are_found():
    assert {path.name for path in CUDA_SOURCES} >= {"score.cu", "merge.cu"}


def test_every_kernel_first_awaits_the_previous_kernel():
    """KernelLauncher lets a kernel start before the previous one in the stream ends (common.cuh):
    each kernel must wait for it before touching memory, or it reads stale data."""
    for path in CUDA_SOURCES:
        source = path.read_text()
        kernels = KERNEL.findall(source)
        assert len(kernels) == source.count("__global__"), path.name
        for name, first_statement in kernels:
            assert first_statement == "detail::await_previous_kernel();", f"{path.name}: {name}"


def test_kernels_launch_through_the_launcher():
    for path in CUDA_SOURCES:
        assert "<<<" not in path.read_text(), f"{path.name}: launch with KernelLauncher, not <<<>>>"


def test_the_emulator_translates_every_shared_declaration():
    """The CPU emulation (csrc/cuda/emulation) gives each block its own `__shared__` variables by
    rewriting their one-line declarations; one it cannot rewrite would be shared by all blocks."""
    to_cpp = load_to_cpp()
    for path in CUDA_SOURCES + [CUDA_DIR / "common.cuh"]:
        source = path.read_text()
        translated = to_cpp.translate(source)  # raises on a declaration it cannot rewrite
        assert translated.count("emu::block_shared<") == source.count("__shared__"), path.name
    with pytest.raises(SystemExit, match="one line"):
        to_cpp.translate("__shared__ union {\n  int a;\n} storage;\n")


ASYNC_COPY_PROBE = r"""
#include "common.cuh"
#include <cmath>
#include <cstdio>
using namespace lightkv_cuda::detail;

void probe(const float* from, float* seen) {
  __shared__ float slots[3][4];
  if (threadIdx.x != 0) return;
  copy_16_bytes_async(slots[0], from, true, from);
  close_async_copy_group();
  copy_16_bytes_async(slots[1], from + 4, false, from);  // zeros
  close_async_copy_group();
  copy_16_bytes_async(slots[2], from + 8, true, from);  // left open
  seen[0] = slots[0][0];
  wait_async_copy_groups_but_newest<1>();
  seen[1] = slots[0][0];
  seen[2] = slots[1][0];
  seen[3] = slots[2][0];
  wait_async_copies();
  seen[4] = slots[1][0];
  seen[5] = slots[2][0];
}

int main() {
  float from[12], seen[6];
  for (int i = 0; i < 12; ++i) from[i] = 1.f + i;
  emu::launch(dim3(1), dim3(32), [&] { probe(from, seen); });
  for (float x : seen) std::isnan(x) ? std::printf("nan ") : std::printf("%g ", x);
  return 0;
}
"""


def test_the_emulator_lands_async_copies_only_at_the_wait(tmp_path):
    """The CPU emulation checks the kernels' cp.async waits: a copy's bytes must not be readable
    before the copying thread waits for them (the destination holds NaN until then), and
    wait_group N lands all but the newest N closed groups, as on a GPU."""
    cuda_include = pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    compiler = shutil.which("g++")
    if compiler is None or not (cuda_include / "cuda_runtime.h").exists():
        pytest.skip("needs g++ and the CUDA headers")
    to_cpp = load_to_cpp()
    (tmp_path / "common.cuh").write_text(to_cpp.translate((CUDA_DIR / "common.cuh").read_text()))
    (tmp_path / "probe.cpp").write_text(to_cpp.translate(ASYNC_COPY_PROBE))
    binary = tmp_path / "probe"
    subprocess.run(
        [compiler, "-std=c++20", "-pthread", "-w", f"-I{EMULATION}", f"-I{CUDA_DIR}", f"-I{cuda_include}",
         str(tmp_path / "probe.cpp"), str(EMULATION / "runtime_on_cpu.cpp"), "-o", str(binary)],
        check=True, cwd=tmp_path)
    seen = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.split()
    assert seen == ["nan", "1", "nan", "nan", "0", "9"]
