"""A real HTTPS mirror on 127.0.0.1 that misbehaves on request, for the download tests.

The first path segment picks the behaviour, e.g. ``https://127.0.0.1:PORT/truncated/`` is a
mirror that cuts every file short. The certificate comes from a throwaway CA (trustme) that
the client trusts through SSL_CERT_FILE, so TLS is verified for real.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BEHAVIOURS = ("good", "corrupt", "truncated", "notgzip", "html", "missing", "hang", "flaky", "slow")
#: ``redirect301/`` .. ``redirect308/``: answer every file with that status and a Location of
#: ``redirect_to`` + the file's name.
REDIRECT_PREFIX = "redirect"


class MirrorServer:
    def __init__(self, files: Path, ca_file: Path, server_cert: object) -> None:
        self.files = files
        self.requests: Counter[str] = Counter()
        self.hang_s = 5.0
        self.redirect_to = ""
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_cert.configure_cert(context)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.ca_file = ca_file

    def url(self, behaviour: str) -> str:
        return f"https://127.0.0.1:{self.port}/{behaviour}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                _, behaviour, name = self.path.split("/", 2)
                server.requests[behaviour] += 1
                path = server.files / name
                if behaviour.startswith(REDIRECT_PREFIX):
                    self.send_response(int(behaviour.removeprefix(REDIRECT_PREFIX)))
                    self.send_header("Location", server.redirect_to + name)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if behaviour == "missing" or not path.exists():
                    return self.send_error(404, "Not Found")
                body = path.read_bytes()
                if behaviour == "hang":
                    time.sleep(server.hang_s)
                if behaviour == "flaky" and server.requests[behaviour] % 2 == 1:
                    return self.send_error(503, "Service Unavailable")
                if behaviour == "html":
                    page = b"<html><body>Access denied</body></html>"
                    return self._send(page, "text/html")
                if behaviour == "corrupt":
                    body = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07", mtime=0)
                if behaviour == "notgzip":
                    body = gzip.decompress(body)
                if behaviour == "truncated":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return None
                if behaviour == "slow":  # 4 KiB every 20 ms: a download that takes a while
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    for i in range(0, len(body), 4096):
                        self.wfile.write(body[i : i + 4096])
                        self.wfile.flush()
                        time.sleep(0.02)
                    return None
                return self._send(body, "application/octet-stream")

            def _send(self, body: bytes, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
