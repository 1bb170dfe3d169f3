"""Source rules of the CUDA kernels that only a GPU run could otherwise catch (as a rare race)."""
import importlib.util
import pathlib
import re

import pytest

CUDA_SOURCES = sorted((pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda").glob("*.cu"))
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
    emulation = CUDA_SOURCES[0].parent / "emulation"
    spec = importlib.util.spec_from_file_location("to_cpp", emulation / "to_cpp.py")
    to_cpp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(to_cpp)
    for path in CUDA_SOURCES + [CUDA_SOURCES[0].parent / "common.cuh"]:
        source = path.read_text()
        translated = to_cpp.translate(source)  # raises on a declaration it cannot rewrite
        assert translated.count("emu::block_shared<") == source.count("__shared__"), path.name
    with pytest.raises(SystemExit, match="one line"):
        to_cpp.translate("__shared__ union {\n  int a;\n} storage;\n")
