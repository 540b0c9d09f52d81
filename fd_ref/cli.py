"""Running a script's ``main``: user errors become one line on stderr and exit code 2, no traceback."""
from __future__ import annotations

import sys
from typing import Callable

from .errors import UserError


def run_main(main: Callable[[], object]) -> None:
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _shutdown_distributed()
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr, flush=True)
        _shutdown_distributed()
        raise SystemExit(130) from None


def _shutdown_distributed() -> None:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
