"""The build job's child process: ``python -m app.builds '<BuildRequest JSON>'`` (started by ``jobs.JobQueue``).

Progress lines go to stdout, which the queue keeps as the job's progress; an error ends with a line starting
``error:`` and exit status 3, the same as ``segment compile``.
"""

import logging
import sys

from .compiler import compile_model
from .options import BuildRequest


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    request = BuildRequest.model_validate_json(argv[0])
    try:
        compile_model(request.source, request.output, request.options, progress=lambda line: print(line, flush=True))
    except ValueError as exc:  # ServiceError and the libraries' own refusals of a bad model
        print(f"error: {exc}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
