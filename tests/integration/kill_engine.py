"""``python -m server`` with a fault injector: SIGUSR1 kills the engine thread.

The kill is real: ``PyThreadState_SetAsyncExc`` raises ``SystemExit`` inside the thread
named "engine" at its next bytecode boundary (mid-step if it is stepping), as an
uncaught crash of that thread would. Usage: ``python kill_engine.py [server flags]``.
"""

from __future__ import annotations

import ctypes
import signal
import sys
import threading
from types import FrameType


def kill_engine_thread(signum: int, frame: FrameType | None) -> None:
    for thread in threading.enumerate():
        if thread.name == "engine" and thread.ident is not None:
            hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))
            print(f"fault injected into the engine thread ({hit} thread)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, kill_engine_thread)
    from server.__main__ import main

    sys.exit(main(sys.argv[1:]))
