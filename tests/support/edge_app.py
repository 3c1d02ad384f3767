"""An app for the edge's tests, run in the sandbox by the host's python3 with nothing but
the standard library (the project's secret APP_SOURCE holds it; the deployment's command is
`MARKER=... exec python3 -c "$APP_SOURCE"`):

GET /         its MARKER (which release answered)
GET /headers  the request's headers as JSON (what the edge passed on)
GET /slow     MARKER after SLOW_SECONDS (a request in flight across a rollout)
GET /whoami   MARKER and a token this process drew at start (which replica answered)
WebSocket     any path with `Upgrade: websocket`: every text or binary message echoed
"""

from __future__ import annotations

APP_SOURCE = r"""
import base64, hashlib, json, os, struct, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKER = os.environ.get("MARKER", "")
TOKEN = os.urandom(6).hex()
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            self.close_connection = True
            return self.echo()
        if self.path == "/slow":
            time.sleep(float(os.environ.get("SLOW_SECONDS", "2")))
        text = json.dumps(dict(self.headers)) if self.path == "/headers" else MARKER
        if self.path == "/whoami":
            text = MARKER + " " + TOKEN
        body = text.encode()
        # One write: headers then body in two would wait on Nagle and a delayed ACK (40 ms).
        head = "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        self.wfile.write(head.encode() + body)

    def echo(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                return
            if opcode in (1, 2):
                n = len(data)
                size = bytes([n]) if n < 126 else b"\x7e" + struct.pack(">H", n)
                self.wfile.write(bytes([0x80 | opcode]) + size + data)
                self.wfile.flush()


ThreadingHTTPServer(("", int(os.environ["PORT"])), App).serve_forever()
"""


def command(marker: str) -> str:
    """The deployment command running the app as release `marker`."""
    return f'MARKER={marker} exec python3 -c "$APP_SOURCE"'
