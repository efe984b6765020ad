"""A tokenizer service for testing the emulated runner on its own: it answers the four calls as the real one
does (the vendor's one-turn prompt for /encode), records every connection and request byte for byte, and can
answer a given /decode late, with another status, or stop listening."""
import json
import socketserver
import threading
import time

from app.tokenizer.pieces import Pieces


class FakeTokenizerService:
    """`decode_delay` {n: seconds} and `decode_status` {n: status} act on the nth /decode (from 1);
    `refuse_after_decode`: once that many /decode calls are answered, the port stops listening."""

    def __init__(self, tokenizer_dir, decode_delay=None, decode_status=None, refuse_after_decode=None):
        self.pieces = Pieces(tokenizer_dir)
        # Now, not at the first /encode: loading takes some 0.5 s here and more on a busy machine, and the
        # emulator, like the vendor's loop, dies when an answer is later than 1 s.
        self.pieces.load_encoder()
        self.decode_delay = decode_delay or {}
        self.decode_status = decode_status or {}
        self.refuse_after_decode = refuse_after_decode
        self.connections = 0
        self.requests = []        # (method, path, [header lines], body bytes)
        self.decodes = []         # the ids of each /decode, in order
        self.decode_seen = threading.Event()  # set at every /decode received
        self._lock = threading.Lock()
        service = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                with service._lock:
                    service.connections += 1
                head = self.rfile.readline()
                if not head:
                    return
                method, path, _ = head.decode("latin-1").split()
                headers = []
                while (line := self.rfile.readline()) not in (b"\r\n", b""):
                    headers.append(line.decode("latin-1").rstrip("\r\n"))
                length = next((int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length")), 0)
                body = self.rfile.read(length)
                with service._lock:
                    service.requests.append((method, path, headers, body))
                status, answer = service.answer(path, body)
                data = json.dumps(answer).encode()
                self.wfile.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
                                 f"\r\nConnection: close\r\n\r\n".encode() + data)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def answer(self, path, body):
        if path == "/bos_id":
            return 200, {"bos_id": -1}
        if path == "/eos_id":
            return 200, {"eos_id": self.pieces.eos_id}
        request = json.loads(body)
        if path == "/encode":
            return 200, {"token_ids": self.pieces.vendor_prompt_ids(request["text"])}
        with self._lock:
            self.decodes.append(request["token_ids"])
            n = len(self.decodes)
        self.decode_seen.set()
        time.sleep(self.decode_delay.get(n, 0))
        if n == self.refuse_after_decode:
            self.stop_listening()
        if n in self.decode_status:
            return self.decode_status[n], {"error": "injected"}
        return 200, {"text": self.pieces.decode(request["token_ids"])}

    def stop_listening(self):
        """From now on, connecting is refused (ECONNREFUSED)."""
        self.server.shutdown()
        self.server.server_close()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
