"""Python reward functions and a local HTTP reward endpoint for the reward tests.

The driver imports these as ``tests.reward_functions:NAME`` (the tests run it from the
repository root, which Ray's workers also search), as a user names their own module.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BATCH = 16  # the failing run's ppo.batch_size: its first step scores exactly this many texts
_seen = 0  # texts scored so far in this process (the reward actor)


def the_count(prompts: list[str], responses: list[str]) -> list[float]:
    """How often the word "the" occurs in the response: a frequent token, so the stand-in policy
    learns to say it more within a few steps."""
    return [float(r.lower().split().count("the")) for r in responses]


def response_chars(prompts: list[str], responses: list[str]) -> list[float]:
    """The response's length in characters, scaled down (what the HTTP endpoint serves)."""
    return [len(r) / 100 for r in responses]


def fails_in_step_two(prompts: list[str], responses: list[str]) -> list[float]:
    """Scores step 1 (its first BATCH texts), then raises: the run must stop with one line."""
    global _seen
    _seen += len(prompts)
    if _seen > BATCH:
        raise ZeroDivisionError("the reward broke on purpose")
    return [0.0] * len(prompts)


class Endpoint:
    """A JSON reward endpoint on 127.0.0.1, served from a thread: POST {"prompts", "responses"}
    -> {"rewards": fn(prompts, responses)}. ``fail_first`` requests answer HTTP 503 first."""

    def __init__(self, fn: Callable[[list[str], list[str]], list], fail_first: int = 0) -> None:
        self.fn, self.fail_first, self.requests = fn, fail_first, 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests += 1
                if endpoint.requests <= endpoint.fail_first:
                    self.send_error(503)
                    return
                out = json.dumps({"rewards": endpoint.fn(body["prompts"], body["responses"])}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
