"""The network rule, enforced: every Python process of a test run records any attempt to
reach an address off this machine (``socket.getaddrinfo`` of a remote name, ``connect`` to
a remote address) in the file ``$MNIST_NETAUDIT_LOG``, with the command and the stack that
made it; the test session fails if that file is not empty (``tests/conftest.py``).

Loaded at start-up by the test run's ``sitecustomize`` (this folder). Allowed: loopback, this
machine's own name, the namespace hosts of ``make cluster`` (198.18.0.0/15), Unix sockets.
Uses only the standard library and does nothing without ``$MNIST_NETAUDIT_LOG``."""

import ipaddress
import os
import socket
import sys

LOG = os.environ.get("MNIST_NETAUDIT_LOG")
LAB = ipaddress.ip_network("198.18.0.0/15")


def on_machine(host: object) -> bool:
    """Whether ``host`` (a name or an address) stays on this machine or the namespace lab."""
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host is None or not isinstance(host, str):
        return True  # a Unix socket path, or no host at all (a wildcard bind)
    if host in ("", "localhost", "localhost.localdomain", socket.gethostname()):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return host.endswith(".localhost")
    return address.is_loopback or address.is_unspecified or address in LAB


def record(what: str) -> None:
    import traceback

    stack = "".join(traceback.format_stack(limit=10)[:-2])
    with open(LOG, "a", encoding="utf-8") as log:
        log.write(f"pid {os.getpid()} ({' '.join(sys.argv)[:200]}): {what}\n{stack}\n")


def hook(event: str, args: tuple) -> None:
    try:
        if event == "socket.getaddrinfo" and not on_machine(args[0]):
            record(f"getaddrinfo({args[0]!r}, {args[1]!r})")
        elif (
            event == "socket.connect" and isinstance(args[1], tuple) and not on_machine(args[1][0])
        ):
            record(f"connect to {args[1]!r}")
    except Exception:  # an audit hook must never break the process it watches
        pass


if LOG:
    sys.addaudithook(hook)
