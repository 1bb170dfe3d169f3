"""The CUDA kernels' logic on every machine, GPU or not, on the CPU emulation (csrc/cuda/emulation):
a sample of the self-test's cases (csrc/cuda/selftest) under AddressSanitizer and
UndefinedBehaviorSanitizer, each checking the kernels' outputs against the self-test's host oracle
(a missing cp.async wait reads NaN; an out-of-bounds or misaligned access stops the run), and the
public API over the emulated ops against lightkv_ext.reference, on a shape matrix and on random
cases. `bash csrc/cuda/emulation/run.sh` runs all the self-test's cases, ThreadSanitizer over them
and random cases for as long as it is given."""
import os
import subprocess
import sys

import pytest
from emulation import EMULATION, load_build

# Self-test case names (--only), picked for a few minutes on 2 cores that reach every kernel:
# both scoring walks and the one pass, image tables, fp32/fp16/bf16 with head-dim tails, the
# pipelined column-mass items and the rows combined between the passes, exact and screened merge
# decisions, feature splits, block groups with stacked and single src blocks, exact mode's screened
# sums and their recheck, ties, rows grouped inside the selection and token-major output.
CASES = [
    "gqa masked sizes",
    "ten images",
    "text rows past the bound",
    "D=160",
    "runs of column items",
    "one pass, 18 column tiles",
    "fp16 deep column items, rows combined",
    "uneven windows",
    "token-major io",
    "one window 300",
    "feature splits",
    "src blocks",
    "screened sums",
    "tied keys",
    "rows of 2000",
]


@pytest.fixture(scope="module")
def build():
    module = load_build()
    if module.missing_tools():
        pytest.skip(f"needs {module.missing_tools()}")
    return module


@pytest.fixture(scope="module")
def selftest(build, tmp_path_factory):
    return build.build_selftest(tmp_path_factory.mktemp("emulation"), sanitize="address,undefined")


@pytest.mark.parametrize("case", CASES)
def test_the_emulated_kernels_pass_the_self_test(selftest, case):
    run = subprocess.run([str(selftest), "--small", "--only", case], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == "lightkv_cuda_selftest: all checks passed"
    assert any(case in line for line in lines[:-1])


@pytest.fixture(scope="module")
def library(build, tmp_path_factory):
    return build.build_library(tmp_path_factory.mktemp("emulated_ops"))


def run_over_emulated_ops(library, script, *args):
    """A script of emulation/ with the public API's ops swapped for the emulated kernels
    (emulated_ops.py, the twin of ops_cuda.cpp)."""
    return subprocess.run([sys.executable, str(EMULATION / script), *args], capture_output=True, text=True,
                          cwd=EMULATION.parents[2], env=dict(os.environ, LIGHTKV_EMULATED_LIB=str(library)))


def test_the_emulated_ops_match_the_reference(library):
    """check_reference.py: compress through the public API on the CUDA tests' shape matrix."""
    run = run_over_emulated_ops(library, "check_reference.py")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1] == "failures: 0"
    assert "FAIL" not in run.stdout


def test_random_cases_over_the_emulated_ops_match_the_reference(library):
    """random_cases.py: the same on 24 random cases (fixed seed): shapes, dtypes, knobs and
    arguments the matrix does not name, determinism and untouched inputs."""
    run = run_over_emulated_ops(library, "random_cases.py", "--seed", "0", "--cases", "24")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1] == "cases: 24 failures: 0"
