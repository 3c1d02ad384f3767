"""A tiny HTTP app for build tests: answers every GET with its dependency's greeting."""

from __future__ import annotations

import os
from http.server import BaseHTTPRequestHandler, HTTPServer

import hangar_greeting


class Greeter(BaseHTTPRequestHandler):
    """Replies to any GET with the greeting from the installed hangar_greeting package."""

    def do_GET(self) -> None:
        # The project's secrets are the app's environment.
        body = (hangar_greeting.greet() + os.environ.get("GREETING_SUFFIX", "") + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    HTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8000"))), Greeter).serve_forever()
