"""A minimal OpenAI-compatible completions server for our engine (loopback use: tests and single-machine notebooks).

    with serve(engine_backend, host="127.0.0.1", port=0) as srv:     # port 0: the OS picks a free port
        HTTPBackend(srv.url).generate(...)

Endpoints: `GET /v1/models`, `POST /v1/completions` with `prompt` as a string, a list of strings, a list of token ids,
or a list of token-id lists; `max_tokens`, `temperature`, `top_p`, `seed`; each choice carries `text`,
`token_ids` (vLLM's `return_token_ids` field), `finish_reason`, and `usage` counts tokens.

Notable features:
- Standard library only (`http.server.ThreadingHTTPServer` in a daemon thread); generation requests are serialised
  with a lock (one model, one batch at a time); each request's prompts are batched by the engine.
- Bounded: request bodies over `max_body_bytes`, more than `max_prompts` prompts or `max_tokens` above
  `max_new_tokens_limit` get HTTP 413/400 with a message, never a hang; bad JSON or fields get HTTP 400 naming them.
- It stops itself: `close()` / leaving the `with` block shuts it down, and `idle_timeout_s` (optional) shuts it down
  after that long without a request, so a forgotten server in a test or notebook does not outlive its purpose.
- Binds loopback by default; binding another address must be asked for explicitly.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from zaya_lib.ttc.backends import Backend

__all__ = ["CompletionServer", "serve"]


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: tests and notebooks do not want access logs on stderr
        pass

    def _send(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, msg: str) -> None:
        self._send(code, {"error": {"message": msg, "type": "invalid_request_error", "code": code}})

    def do_GET(self):
        self.server.owner.touch()
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.owner.model_name, "object": "model"}]})
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self):
        owner = self.server.owner
        owner.touch()
        if self.path.rstrip("/") != "/v1/completions":
            self._error(404, f"no route POST {self.path}")
            return
        n = int(self.headers.get("Content-Length") or 0)
        if n > owner.max_body_bytes:
            self._error(413, f"request body of {n} bytes exceeds the limit of {owner.max_body_bytes}")
            self.close_connection = True
            return
        try:
            body = json.loads(self.rfile.read(n) or b"{}")
            prompts, kw = owner.parse(body)
        except json.JSONDecodeError as e:
            self._error(400, f"invalid JSON body: {e}")
            return
        except ValueError as e:
            self._error(400, str(e))
            return
        try:
            with owner.lock:
                comps = owner.backend.generate(prompts, **kw)
        except Exception as e:  # the model failed: report it, keep serving
            self._error(500, f"generation failed: {type(e).__name__}: {e}")
            return
        owner.requests_served += 1
        choices = [{"index": i, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                    "logprobs": None} for i, c in enumerate(comps)]
        n_prompt = sum(len(p) for p in prompts if not isinstance(p, str))
        self._send(200, {"id": f"cmpl-{owner.requests_served}", "object": "text_completion",
                         "created": int(time.time()), "model": owner.model_name, "choices": choices,
                         "usage": {"prompt_tokens": n_prompt,
                                   "completion_tokens": sum(c.num_generated for c in comps)}})


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: "CompletionServer"


class CompletionServer:
    """Serves `backend` (usually an `EngineBackend`) on host:port in a background thread. See the module docstring."""

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 0, model_name: str = "zaya",
                 max_prompts: int = 1024, max_new_tokens_limit: int = 4096, max_body_bytes: int = 16 << 20,
                 idle_timeout_s: float | None = None, allow_non_loopback: bool = False):
        if host not in ("127.0.0.1", "localhost", "::1") and not allow_non_loopback:
            raise ValueError(f"refusing to bind {host!r}: this server is for loopback; pass allow_non_loopback=True")
        self.backend, self.model_name = backend, model_name
        self.max_prompts, self.max_new_tokens_limit, self.max_body_bytes = max_prompts, max_new_tokens_limit, max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.lock = threading.Lock()
        self.requests_served = 0
        self._last = time.monotonic()
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.owner = self
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"zaya-server-{self.port}", daemon=True)
        self._closed = threading.Event()
        self._thread.start()
        if idle_timeout_s is not None:
            threading.Thread(target=self._watchdog, daemon=True, name="zaya-server-idle").start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return not self._closed.is_set()

    def touch(self) -> None:
        self._last = time.monotonic()

    def _watchdog(self) -> None:
        while not self._closed.wait(min(1.0, self.idle_timeout_s)):
            if time.monotonic() - self._last > self.idle_timeout_s and not self.lock.locked():
                self.close()

    def parse(self, body: Any) -> tuple[list, dict]:
        """Validate a /v1/completions body; ValueError names the offending field."""
        if not isinstance(body, dict):
            raise ValueError("request body must be a JSON object")
        if body.get("n", 1) != 1:
            raise ValueError("only n=1 is supported")
        p = body.get("prompt")
        if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)):
            prompts = [p]
        elif isinstance(p, list) and p and all(isinstance(x, str) or (isinstance(x, list) and x and
                                                all(isinstance(t, int) for t in x)) for x in p):
            prompts = p
        else:
            raise ValueError("'prompt' must be a string, a list of strings, a list of token ids, or a list of "
                             "token-id lists (non-empty)")
        if len(prompts) > self.max_prompts:
            raise ValueError(f"{len(prompts)} prompts exceed the limit of {self.max_prompts} per request")
        mt = body.get("max_tokens", 16)
        if not isinstance(mt, int) or not 1 <= mt <= self.max_new_tokens_limit:
            raise ValueError(f"'max_tokens' must be an int in [1, {self.max_new_tokens_limit}], got {mt!r}")
        temp, top_p, seed = body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("seed", 0)
        if not isinstance(temp, (int, float)) or temp < 0:
            raise ValueError(f"'temperature' must be a number >= 0, got {temp!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"'top_p' must be in (0, 1], got {top_p!r}")
        if not isinstance(seed, int):
            raise ValueError(f"'seed' must be an int, got {seed!r}")
        return prompts, dict(max_new_tokens=mt, temperature=float(temp), top_p=float(top_p), seed=seed)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "CompletionServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(backend: Backend, host: str = "127.0.0.1", port: int = 0, **kw: Any) -> CompletionServer:
    """Start a `CompletionServer` (returns once it is listening)."""
    return CompletionServer(backend, host=host, port=port, **kw)
