"""Entry point: `python -m kiln_worker`, started by a gpu-agent, which owns its stdin/stdout.

1. Protect the protocol stream: frames go to a private dup of fd 1; fd 1 and sys.stdout now
   point at stderr, so nothing printed later (libraries, CUDA) can corrupt a frame.
2. Tie our life to the agent's: PR_SET_PDEATHSIG=SIGTERM on Linux, and exit on stdin EOF.
3. Read the configuration from the environment (exit 2 naming every bad variable).
4. Load the backend (exit 3 if it is not available in this build).
5. Serve requests until `shutdown` (reply bye) or stdin EOF; exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

EXIT_CONFIG = 2
EXIT_BACKEND_UNAVAILABLE = 3


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the agent dies, so no worker outlives its agent."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            logging.getLogger("kiln_worker").warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        logging.getLogger("kiln_worker").warning("cannot set PR_SET_PDEATHSIG: %s", exc)
    if os.getppid() != parent:  # the agent died before prctl took effect
        os._exit(0)


def main() -> int:
    from .protocol import FrameWriter, protect_stdout

    proto = protect_stdout()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"%(asctime)s kiln_worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("kiln_worker")
    _die_with_parent()

    from .config import ConfigError, load_config

    try:
        config = load_config(os.environ)
    except ConfigError as exc:
        print(f"kiln_worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    from .backends import BackendUnavailable, load_backend

    try:
        backend = load_backend(config.backend, config)
    except BackendUnavailable as exc:
        print(f"kiln_worker: {exc}", file=sys.stderr)
        return EXIT_BACKEND_UNAVAILABLE

    from .worker import Worker

    log.info("serving with the %s backend on %s", backend.name, backend.device()["name"])
    code = Worker(backend, FrameWriter(proto)).run()
    try:
        proto.flush()
    except OSError:
        pass
    return code


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # os._exit: the stdin reader thread may be blocked in read(); don't wait on interpreter teardown
    os._exit(code)
