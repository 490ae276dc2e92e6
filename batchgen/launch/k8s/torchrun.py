"""``python -m batchgen.launch.k8s.torchrun [torchrun args]``: torchrun that exits with the failing worker's exit code.

Plain torchrun exits 1 whenever a child fails, which would make the operator's ``restartPolicy: ExitCode`` treat
a preempted worker (143) as a permanent failure. This keeps torchrun's behaviour and arguments (it reads the
``PET_*`` variables the training operator injects) and only maps the outcome:
- the first failing rank's exit code (the root cause; the others were stopped because of it);
- a child killed by a signal, or torchrun itself signalled: 128 + the signal number (retryable).
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("batchgen.k8s.launch")


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from batchgen.worker.contract import exit_code_of

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = exit_code_of(failure.exitcode) or 1
        log.error("rank %s failed first with exit code %s", rank, code)
        return code
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
