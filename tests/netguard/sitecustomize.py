"""Blocks and records every attempt to reach a non-loopback address, in this process and children.

Tests put this directory on PYTHONPATH for the server (and so its runner processes): any DNS lookup
of a non-local name or any connection beyond loopback raises, and is written to the file named by
APPLIANCE_NETGUARD_LOG, which the test suite then asserts is empty.
"""

import ipaddress
import os
import socket
import sys

_LOG = os.environ.get("APPLIANCE_NETGUARD_LOG")
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "", None}


def _is_local(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in _LOCAL_NAMES or (isinstance(host, str) and host.endswith(".localhost")):
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _record(what: str) -> None:
    if _LOG:
        with open(_LOG, "a") as handle:
            handle.write(f"{os.getpid()} {what}\n")


def _audit(event: str, args) -> None:
    if event == "socket.connect":
        sock, address = args[0], args[1]
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            _record(f"connect {address!r}")
            raise OSError(101, f"network blocked by test guard: connect to {address!r}")
    elif event == "socket.getaddrinfo":
        host = args[0]
        if not _is_local(host):
            _record(f"getaddrinfo {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"network blocked by test guard: lookup of {host!r}")


if _LOG:
    sys.addaudithook(_audit)
