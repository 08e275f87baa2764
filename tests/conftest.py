import os
import sys

# Triton kernels run on the CPU through the interpreter; it must be switched on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
