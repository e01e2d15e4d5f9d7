"""A loopback stand-in for Anthropic's Messages API, enough for a real `claude -p` turn.

Standard library only: the e2e guest runs it with Debian's /usr/bin/python3.

POST /v1/messages answers with the documented streaming events (message_start,
content_block_start, content_block_delta, content_block_stop, message_delta, message_stop)
or, with "stream": false, one JSON message. The reply text is
    model reply #<n> to '<last user text>' (<m> messages)
so a test can tell which prompt was answered and whether a resumed turn carried the
earlier messages along (2 messages on a first turn, 4 on the second).
A prompt containing FAIL-WITH-400 gets an invalid_request_error instead.

    python3 fake_model.py --port 8765 [--log FILE]
"""

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_count_lock = threading.Lock()
_count = 0


def _next_number() -> int:
    global _count
    with _count_lock:
        _count += 1
        return _count


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [b.get("text", "") for b in content if isinstance(b, dict)]
        return " ".join(p for p in parts if p and not p.startswith("<system-reminder>"))
    return ""


def _last_user_text(messages: list) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text_of(message.get("content")).strip()
    return ""


def _sse(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    log_file: str | None = None

    def log_message(self, format: str, *args: object) -> None:
        if self.log_file:
            with open(self.log_file, "a") as log:
                log.write(format % args + "\n")

    def do_HEAD(self) -> None:
        self._send(200, b"", "text/plain")

    def do_GET(self) -> None:
        self._send(200, b"{}", "application/json")

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if not self.path.startswith("/v1/messages") or "count_tokens" in self.path:
            self._send(200, json.dumps({"input_tokens": 10}).encode(), "application/json")
            return
        messages = body.get("messages") or []
        prompt = _last_user_text(messages)
        self._record(body, prompt)
        if "FAIL-WITH-400" in prompt:
            error = {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "fake model refuses this prompt",
                },
            }
            self._send(400, json.dumps(error).encode(), "application/json")
            return
        text = f"model reply #{_next_number()} to {prompt!r} ({len(messages)} messages)"
        if body.get("stream"):
            self._stream(body.get("model", "fake"), text)
        else:
            self._send(
                200,
                json.dumps(_message(body.get("model", "fake"), text)).encode(),
                "application/json",
            )

    def _record(self, body: dict, prompt: str) -> None:
        if self.log_file:
            summary = {"messages": len(body.get("messages") or []), "prompt": prompt}
            with open(self.log_file, "a") as log:
                log.write(json.dumps(summary) + "\n")

    def _stream(self, model: str, text: str) -> None:
        message = _message(model, "")
        message["content"] = []
        events = [
            _sse("message_start", {"type": "message_start", "message": message}),
            _sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            _sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": text},
                },
            ),
            _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 12},
                },
            ),
            _sse("message_stop", {"type": "message_stop"}),
        ]
        self._send(200, b"".join(events), "text/event-stream")

    def _send(self, code: int, payload: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(payload)))
        self.send_header("request-id", "req_fake")
        self.end_headers()
        self.wfile.write(payload)


def _message(model: str, text: str) -> dict:
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 12},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--log")
    args = parser.parse_args()
    Handler.log_file = args.log
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
