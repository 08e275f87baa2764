"""pytest's set-up for the whole suite: the Triton interpreter on CPU, the repository on sys.path, the kernels on
when a GPU is there, and the kernel tests left out where triton is not installed."""
import importlib.util
import os
import sys

import pytest

# Triton kernels run on the CPU through the interpreter; it must be switched on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# On a GPU the tests run the Triton kernels (MINILLAVA_KERNELS=1), whatever the library's default is.
if importlib.util.find_spec("torch") and __import__("torch").cuda.is_available():
    os.environ.setdefault("MINILLAVA_KERNELS", "1")

# The kernel tests need the triton package (a CPU install may lack it: `pip install -e ".[test]"` brings it).
collect_ignore_glob = [] if importlib.util.find_spec("triton") else ["test_kernel_*.py"]


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): one thread beats several
    (OpenMP start-up and spinning cost more than the math, and on a busy machine threads waiting for each other make
    a step 10-40x slower; subprocesses get OMP_NUM_THREADS=1)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
