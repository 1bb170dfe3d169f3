"""Turn a .cu file into C++ for cuda_on_cpu.h: include that header first and drop the CUB
includes (the header has host versions). Kernels launch through common.cuh's KernelLauncher,
which the header replaces.

Usage: python to_cpp.py in.cu out.cpp
"""
import re
import sys


def translate(src: str) -> str:
    return '#include "cuda_on_cpu.h"\n' + re.sub(r"#include <cub/[^>]*>\n", "", src)


if __name__ == "__main__":
    with open(sys.argv[1]) as source, open(sys.argv[2], "w") as target:
        target.write(translate(source.read()))
