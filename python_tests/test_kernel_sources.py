"""Source rules of the CUDA kernels that only a GPU run could otherwise catch (as a rare race)."""
import pathlib
import re

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
