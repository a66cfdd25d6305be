"""A live `launch/serve.py` job for tests: start it, find its URL, talk to it."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

from tests.live import LiveJob

SERVING_RE = re.compile(r"\[rank 0 \([^)]*\)\] serving \S+ at (http://\S+)/v1 ")
MODEL = "glm4_moe"


class Server(LiveJob):
    """launch/serve.py on n local ranks (tiny synthetic GLM-4 MoE unless args say),
    listening on a free port."""

    def __init__(self, n: int = 2, args: list = (), model_args=None, env=None):
        model_args = model_args or ["--model", MODEL, "--synthetic", "tiny"]
        super().__init__(n, [*model_args, "--port", "0", *args], env=env,
                         script="launch/serve.py")
        self.url = None

    def wait_ready(self, timeout: float = 90) -> str:
        """Until rank 0 says it serves; returns its base URL (without /v1)."""
        self.wait_for(lambda: SERVING_RE.search(self.stderr), timeout, "the 'serving' line")
        self.url = SERVING_RE.search(self.stderr).group(1)
        return self.url

    def client(self, timeout: float = 60):
        """The official openai client, no retries (a 429 or 503 must show)."""
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                      timeout=timeout)

    def http(self, method: str, path: str, body=None, timeout: float = 30) -> tuple:
        """(status, parsed JSON body) of a raw request; `body` bytes, str or JSON-able."""
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def health(self) -> tuple:
        return self.http("GET", "/health")

    def wait_health(self, predicate, timeout: float = 15, what: str = "never got there"):
        """/health's body once `predicate(body)` holds (polled), else AssertionError."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status, h = self.health()
            if status == 200 and predicate(h):
                return h
            time.sleep(0.05)
        raise AssertionError(f"/health {what}: {h}")
