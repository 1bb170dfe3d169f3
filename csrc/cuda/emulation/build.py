"""Build the CPU emulation of the CUDA kernels with g++ (see run.sh): translate csrc/cuda's sources
to C++ over cuda_on_cpu.h (to_cpp.py) into a build folder and compile them there.

Usage: python build.py BUILD_DIR {selftest,library} [--sanitize LIST]
  selftest: the torch-free self-test (selftest/selftest.cu); library: libemulated.so for
  emulated_ops.py. --sanitize address,undefined or thread builds under those sanitizers. Prints
  the path of what it built.
"""
import argparse
import os
import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
CUDA_DIR = HERE.parent
KERNELS = (CUDA_DIR / "score.cu", CUDA_DIR / "merge.cu")

sys.path.insert(0, str(HERE))
import to_cpp  # noqa: E402


def cuda_include() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"


def missing_tools() -> str:
    """What this machine lacks to build the emulation ('' when nothing)."""
    if shutil.which("g++") is None:
        return "g++"
    if not (cuda_include() / "cuda_runtime.h").exists():
        return f"the CUDA headers ({cuda_include()})"
    return ""


def translate(build: pathlib.Path, source: pathlib.Path, text: str = None) -> pathlib.Path:
    """`source` (or `text` under its name) translated into `build`; .cu files become .cpp."""
    target = build / (source.stem + ".cpp" if source.suffix == ".cu" else source.name)
    target.write_text(to_cpp.translate(source.read_text() if text is None else text))
    return target


def compile_program(build: pathlib.Path, sources, output: str, sanitize: str = None, shared: bool = False):
    """g++ over `sources` and the emulated runtime, into build/output. The translated sources include
    the translated common.cuh from their own folder, before csrc/cuda's."""
    translate(build, CUDA_DIR / "common.cuh")
    command = ["g++", "-std=c++20", "-O1", "-g", "-pthread", "-ffp-contract=off", "-w",
               f"-I{HERE}", f"-I{CUDA_DIR}", f"-I{cuda_include()}"]
    if sanitize:
        command += [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    if shared:
        command += ["-fPIC", "-shared"]
    command += [str(source) for source in sources] + [str(HERE / "runtime_on_cpu.cpp"), "-o", output]
    subprocess.run(command, check=True, cwd=build)
    return build / output


def build_selftest(build: pathlib.Path, sanitize: str = None) -> pathlib.Path:
    sources = [translate(build, kernel) for kernel in KERNELS + (CUDA_DIR / "selftest" / "selftest.cu",)]
    name = "selftest" + ("_" + sanitize.replace(",", "_") if sanitize else "")
    return compile_program(build, sources, name, sanitize)


def build_library(build: pathlib.Path, sanitize: str = None) -> pathlib.Path:
    sources = [translate(build, kernel) for kernel in KERNELS] + [HERE / "capi.cpp"]
    return compile_program(build, sources, "libemulated.so", sanitize, shared=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=pathlib.Path)
    parser.add_argument("what", choices=["selftest", "library"])
    parser.add_argument("--sanitize", help="e.g. address,undefined or thread")
    args = parser.parse_args()
    if missing_tools():
        raise SystemExit(f"build.py: needs {missing_tools()}")
    args.build.mkdir(parents=True, exist_ok=True)
    builder = build_selftest if args.what == "selftest" else build_library
    print(builder(args.build.resolve(), args.sanitize))


if __name__ == "__main__":
    main()
