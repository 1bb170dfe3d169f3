"""Turn a .cu file into C++ for cuda_on_cpu.h: include that header first, drop the CUB includes
(the header has host versions), and make every `__shared__` variable per block: the one-line
declaration `__shared__ T name[N];` becomes a reference to this block's instance,
`static char name_key_; auto& name = emu::block_shared<T[N]>(&name_key_);`. Kernels launch
through common.cuh's KernelLauncher, which the header replaces.

Usage: python to_cpp.py in.cu out.cpp
"""
import re
import sys

SHARED = re.compile(r"__shared__\s+(?P<type>[^;{}]+?)\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]*\]\s*)*);")


def per_block(match: re.Match) -> str:
    name, type_, dims = match["name"], match["type"], match["dims"].replace(" ", "")
    return f"static char {name}_key_; auto& {name} = emu::block_shared<{type_}{dims}>(&{name}_key_);"


def translate(src: str) -> str:
    src = re.sub(r"#include <cub/[^>]*>\n", "", src)
    src = SHARED.sub(per_block, src)
    if "__shared__" in src:
        raise SystemExit("to_cpp.py: a __shared__ declaration it cannot translate (write it on one line)")
    return '#include "cuda_on_cpu.h"\n' + src


if __name__ == "__main__":
    with open(sys.argv[1]) as source, open(sys.argv[2], "w") as target:
        target.write(translate(source.read()))
