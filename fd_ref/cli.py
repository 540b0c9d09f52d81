"""Running a script's ``main``: user errors become one line on stderr and exit code 2, a stopped run (a
failed peer rank) one line and exit code 1, no traceback. Output-folder locks are released on the way out."""
from __future__ import annotations

import sys
from typing import Callable

from fd_ref.engine.distributed import cleanup
from fd_ref.engine.runlock import release_all
from fd_ref.errors import RunStopped, UserError


def run_main(main: Callable[[], object]) -> None:
    try:
        main()
    except (UserError, RunStopped) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        cleanup()
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr, flush=True)
        cleanup()
        raise SystemExit(130) from None
    finally:
        release_all()

