"""Fail on a literal IP address that is neither loopback nor the project's own test hosts.

No test, benchmark or script may send traffic off this machine: the only addresses it may name
are loopback (127.0.0.0/8, ::1), "any" for a listener (0.0.0.0, ::) and the network
namespaces the project creates for its own hosts (198.18.0.0/15, the range RFC 2544 sets aside
for benchmarks, on a bridge with no uplink). Cheap enough for every `make lint`:

    python tools/check_addresses.py src tests bench tools Makefile .ci
"""

from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path

ALLOWED = [
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("0.0.0.0/32"),
    ipaddress.ip_network("198.18.0.0/15"),
]
#: A dotted quad standing alone: not part of a longer dotted number (a five-part version).
QUAD = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?![\w.]*\d)")
SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".toml", ".cfg", ".txt", ""}


def offending(text: str) -> list[tuple[int, str]]:
    """(line number, address) for each literal IPv4 address outside the allowed ranges."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in QUAD.finditer(line):
            try:
                address = ipaddress.ip_address(match.group(1))
            except ValueError:
                continue  # 999.1.2.3: not an address
            if not any(address in net for net in ALLOWED):
                found.append((number, str(address)))
    return found


def files(paths: list[str]) -> list[Path]:
    out = []
    for name in paths:
        path = Path(name)
        candidates = path.rglob("*") if path.is_dir() else [path]
        out += [
            p for p in candidates if p.is_file() and p.suffix in SUFFIXES and ".venv" not in p.parts
        ]
    return sorted(out)


def main(argv: list[str]) -> int:
    bad = [
        f"{path}:{number}: {address}"
        for path in files(argv)
        for number, address in offending(path.read_text(errors="replace"))
    ]
    for line in bad:
        print(f"{line} is not loopback or a project test host (198.18.0.0/15)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["src", "tests", "bench", "tools", "Makefile", ".ci"]))
