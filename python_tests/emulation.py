"""The CPU emulation's builder (csrc/cuda/emulation/build.py) for the test files."""
import importlib.util
import pathlib

EMULATION = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "emulation"


def load_build():
    """build.py as a module (its to_cpp: the translator of .cu sources)."""
    spec = importlib.util.spec_from_file_location("emulation_build", EMULATION / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build
