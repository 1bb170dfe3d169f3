"""Source rules of the CUDA kernels that only a GPU run could otherwise catch (as a rare race)."""
import pathlib
import re
import subprocess

import pytest
from emulation import load_build
from torch.utils import cpp_extension

CUDA_DIR = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
CUDA_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
KERNEL = re.compile(r"__global__\b.*?\b(\w+_kernel)\s*\((?:[^()]|\([^()]*\))*\)\s*\{\s*([^;]*;)", re.S)


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
    to_cpp = load_build().to_cpp
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
#include <cstring>
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

void misaligned_copy(const float* from) {
  __shared__ float slot[4];
  copy_16_bytes_async(slot, from + 1, true, from);
}

void misaligned_stand_in(const float* from) {
  __shared__ float slot[4];
  copy_16_bytes_async(slot, from, false, from + 1);
}

void misaligned_ldmatrix() {
  __shared__ uint16_t rows[33 * 8];
  uint32_t fragments[4];
  load_matrix_x4(fragments, rows + 1 + 8 * (threadIdx.x % 32));
}

int main(int argc, char** argv) {
  alignas(16) float from[12];
  float seen[6];
  for (int i = 0; i < 12; ++i) from[i] = 1.f + i;
  const char* mode = argc > 1 ? argv[1] : "";
  if (std::strcmp(mode, "misaligned copy") == 0) {
    emu::launch(dim3(1), dim3(32), [&] { misaligned_copy(from); });
  } else if (std::strcmp(mode, "misaligned stand-in") == 0) {
    emu::launch(dim3(1), dim3(32), [&] { misaligned_stand_in(from); });
  } else if (std::strcmp(mode, "misaligned ldmatrix") == 0) {
    emu::launch(dim3(1), dim3(32), [&] { misaligned_ldmatrix(); });
  } else {
    emu::launch(dim3(1), dim3(32), [&] { probe(from, seen); });
    for (float x : seen) std::isnan(x) ? std::printf("nan ") : std::printf("%g ", x);
  }
  return 0;
}
"""


def build_probe(tmp_path_factory, source: str, sanitize: str = None) -> pathlib.Path:
    """`source` built over the CPU emulation (csrc/cuda/emulation/build.py)."""
    build = load_build()
    if build.missing_tools():
        pytest.skip(f"needs {build.missing_tools()}")
    folder = tmp_path_factory.mktemp("emulator_probe")
    probe = build.translate(folder, folder / "probe.cpp", source)
    return build.compile_program(folder, [probe], "probe", sanitize)


@pytest.fixture(scope="module")
def emulator_probe(tmp_path_factory):
    return build_probe(tmp_path_factory, ASYNC_COPY_PROBE)


def test_the_emulator_lands_async_copies_only_at_the_wait(emulator_probe):
    """The CPU emulation checks the kernels' cp.async waits: a copy's bytes must not be readable
    before the copying thread waits for them (the destination holds NaN until then), and
    wait_group N lands all but the newest N closed groups, as on a GPU."""
    seen = subprocess.run([str(emulator_probe)], check=True, capture_output=True, text=True).stdout.split()
    assert seen == ["nan", "1", "nan", "nan", "0", "9"]


@pytest.mark.parametrize("mode, what", [("misaligned copy", "cp.async source"),
                                        ("misaligned stand-in", "cp.async stand-in source"),
                                        ("misaligned ldmatrix", "ldmatrix row")])
def test_the_emulator_stops_at_a_misaligned_address(emulator_probe, mode, what):
    """A GPU faults where cp.async or ldmatrix gets an address off 16 bytes; x86 would read it, so
    the emulation aborts and names the access."""
    run = subprocess.run([str(emulator_probe), mode], capture_output=True, text=True)
    assert run.returncode != 0
    assert f"cuda_on_cpu: {what} at " in run.stderr
    assert "is not 16-byte aligned" in run.stderr


HAND_OFF_PROBE = r"""
#include "common.cuh"
#include <cstdio>
#include <cstring>
using namespace lightkv_cuda::detail;

// Each block writes its partial; then the last block (by_ticket) or every block (a race) sums them.
void hand_off(unsigned* partials, unsigned* ticket, unsigned* total, bool by_ticket) {
  if (threadIdx.x == 0) partials[blockIdx.x] = blockIdx.x + 1;
  if (by_ticket && !last_to_arrive(ticket, gridDim.x)) return;
  if (threadIdx.x != 0) return;
  unsigned sum = 0;
  for (unsigned b = 0; b < gridDim.x; ++b) sum += __ldcg(partials + b);
  total[blockIdx.x] = sum;
}

int main(int argc, char** argv) {
  unsigned partials[4] = {}, ticket = 0, total[4] = {};
  const bool by_ticket = argc > 1 && std::strcmp(argv[1], "ticket") == 0;
  emu::launch(dim3(4), dim3(64), [&] { hand_off(partials, &ticket, total, by_ticket); });
  std::printf("%u\n", total[0] + total[1] + total[2] + total[3]);
  return 0;
}
"""


@pytest.fixture(scope="module")
def hand_off_probe(tmp_path_factory):
    return build_probe(tmp_path_factory, HAND_OFF_PROBE, sanitize="thread")


def test_the_emulator_runs_blocks_at_once_and_sees_their_hand_offs(hand_off_probe):
    """A grid's blocks run at once on the CPU emulation, as on a GPU, so ThreadSanitizer checks how
    they hand results to each other: reading the other blocks' partials without a ticket races,
    while after last_to_arrive (common.cuh) only the last block reads them, all of them written."""
    racy = subprocess.run([str(hand_off_probe), "race"], capture_output=True, text=True)
    assert racy.returncode != 0
    assert "ThreadSanitizer: data race" in racy.stderr
    ordered = subprocess.run([str(hand_off_probe), "ticket"], capture_output=True, text=True)
    assert ordered.returncode == 0, ordered.stderr
    assert ordered.stdout.split() == ["10"]


# Headers of the CUDA math libraries that torch's CUDA headers include for their handle and status
# types. A minimal toolkit (this machine's, CI's) lacks them; the glue uses none of them.
MATH_LIBRARY_STUBS = {
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n",
    "cusolver_common.h": "typedef int cusolverStatus_t;\n",
    "cusolverDn.h": "#include <cusolver_common.h>\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\n",
}


def test_the_torch_glue_of_the_cuda_kernels_compiles(tmp_path):
    """ops_cuda.cpp is built only where torch has CUDA (setup.py on a GPU machine). A CPU wheel ships
    torch's CUDA headers too, so here it is compiled against them and the toolkit's (syntax and
    types only, nothing to link): a glue change that does not compile fails CI, not a GPU session."""
    build = load_build()  # the emulation's build: the same tools, the same toolkit headers
    if build.missing_tools():
        pytest.skip(f"needs {build.missing_tools()}")
    cuda_include = build.cuda_include()
    torch_include = [pathlib.Path(path) for path in cpp_extension.include_paths()]
    if not (torch_include[0] / "ATen" / "cuda" / "CUDAEvent.h").exists():
        pytest.skip("this torch ships no CUDA headers")
    for name, text in MATH_LIBRARY_STUBS.items():
        if not (cuda_include / name).exists():
            (tmp_path / name).write_text(text)
    system_includes = [flag for path in (*torch_include, cuda_include, tmp_path) for flag in ("-isystem", str(path))]
    command = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
               "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",  # a generated header of torch's own build
               *system_includes, "-I", str(CUDA_DIR.parent), str(CUDA_DIR / "ops_cuda.cpp")]
    compiled = subprocess.run(command, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr


def test_cmake_compiles_the_kernels_with_the_flags_of_the_extension_build():
    """CI builds the kernels with CMake, a GPU machine with setup.py (torch.utils.cpp_extension):
    CMake must pass nvcc what torch's build passes (C++20, no implicit half/bfloat16 conversions),
    or a kernel could compile in CI and fail in a GPU session's build."""
    cmake = (CUDA_DIR.parents[1] / "CMakeLists.txt").read_text()
    cuda_flags = re.search(r"set\(LIGHTKV_CUDA_FLAGS\s+\$<\$<COMPILE_LANGUAGE:CUDA>:([^>]*)>", cmake)
    assert cuda_flags, "LIGHTKV_CUDA_FLAGS has no CUDA part"
    assert set(cpp_extension.COMMON_NVCC_FLAGS) <= set(cuda_flags.group(1).split())
    assert "-std=c++20" in cuda_flags.group(1).split()
