"""Shared test settings: one intra-op thread and a moderate, deadline-free hypothesis profile.

The test tensors are tiny and the CPUs are shared: with 2 threads on busy cores, OpenMP's spinning threads
made the suite several times slower (measured: a 30-step training test went from ~8 s to 25-48 s).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

settings.register_profile("fd_ref", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fd_ref")


@pytest.fixture(autouse=True, scope="session")
def _auto_precision_is_fp32():
    """In-process runs resolve ``--precision auto`` as on a CPU without native bf16, so the suite's numbers
    (tight tolerances, exact resumes) do not depend on which CPU runs it; tests/test_precision.py tests the
    rule itself with the capability stubbed both ways."""
    from fd_ref.engine import precision
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "cpu_has_native_bf16", lambda: False)
        yield


def distil_then_finetune(tmp_path_factory, student_flags: list, finetune_flags: list) -> tuple:
    """A tiny train.py run, then finetune.py on its student: (student.pt, fine-tuning folder, results)."""
    import finetune
    import train
    fd, ft = tmp_path_factory.mktemp("fd"), tmp_path_factory.mktemp("ft")
    train.main(student_flags + ["--output", str(fd)])
    results = finetune.main(finetune_flags + ["--pretrained", str(fd / "student.pt"), "--output", str(ft)])
    return fd / "student.pt", ft, results


@pytest.fixture(scope="module")
def student(runs):
    """The student.pt of the module's ``runs`` fixture (modules without one define their own ``student``)."""
    return runs[0]
