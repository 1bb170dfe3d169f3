"""Turn a .cu file into C++ for cuda_on_cpu.h: drop the CUB includes (the header has host
versions) and rewrite each `kernel<<<grid, block, ...>>>(args);` into
`emu::launch("kernel", dim3(grid), dim3(block), [&] { kernel(args); });`.

Usage: python to_cpp.py in.cu out.cpp
"""
import re
import sys


def kernel_start(src: str, launch_at: int) -> int:
    """Start of the kernel expression before `<<<`: a name with optional template arguments."""
    at = launch_at
    if src[at - 1] == ">":
        depth = 0
        while True:
            at -= 1
            depth += {">": 1, "<": -1}.get(src[at], 0)
            if depth == 0:
                break
    return re.search(r"[A-Za-z_][A-Za-z_0-9:]*$", src[:at]).start()


def closing_paren(src: str, open_at: int) -> int:
    depth = 0
    for at in range(open_at, len(src)):
        depth += {"(": 1, ")": -1}.get(src[at], 0)
        if depth == 0:
            return at
    raise ValueError("unbalanced parentheses after a kernel launch")


def top_level_split(text: str) -> list:
    """Split on the commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return parts + [current.strip()]


def translate(src: str) -> str:
    src = re.sub(r"#include <cub/[^>]*>\n", "", src)
    out, done = [], 0
    while (launch_at := src.find("<<<", done)) >= 0:
        start = kernel_start(src, launch_at)
        kernel = src[start:launch_at]
        config_end = src.index(">>>", launch_at)
        grid, block = top_level_split(src[launch_at + 3:config_end])[:2]
        args_open = config_end + 3
        args_close = closing_paren(src, args_open)
        name = re.match(r"[A-Za-z_0-9:]+", kernel).group(0).split("::")[-1]
        out.append(src[done:start])
        out.append(f'emu::launch("{name}", dim3({grid}), dim3({block}), '
                   f'[&] {{ {kernel}({src[args_open + 1:args_close]}); }})')
        done = args_close + 1
    out.append(src[done:])
    return '#include "cuda_on_cpu.h"\n' + "".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as source, open(sys.argv[2], "w") as target:
        target.write(translate(source.read()))
