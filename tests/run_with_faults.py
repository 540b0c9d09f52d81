"""``python tests/run_with_faults.py SCRIPT ARGS...``: run SCRIPT (train.py, finetune.py) as ``__main__`` exactly
as ``python SCRIPT ARGS...`` would, after installing the faults the FD_TEST_* variables ask for
(tests/fault_injection.py)."""
import os
import runpy
import sys

from fault_injection import install_from_env

if __name__ == "__main__":
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` sets it
    install_from_env()
    runpy.run_path(script, run_name="__main__")
