"""Request counters of `memllm serve` in Prometheus text format; labels bounded to the API's routes.

Knows nothing of HTTP frameworks or the model.
"""

from __future__ import annotations

import threading

ROUTE_LABELS = ("/v1/chat/completions", "/v1/models", "/v1/memory/", "/healthz", "/metrics")


def route_label(path: str) -> str:
    """A bounded set of metric labels: the API's routes, every other path counted as "other"."""
    label = next((r for r in ROUTE_LABELS if path == r or (r.endswith("/") and path.startswith(r))), "other")
    return label.rstrip("/")


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens = 0
        self.in_flight = 0

    def count(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def text(self, engine: dict[str, int] | None = None) -> str:
        """The counters; `engine`: an EngineThread's stats (answers decoded together), as memllm_engine_*."""
        lines = ["# TYPE memllm_requests_total counter"]
        with self.lock:
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'memllm_requests_total{{path="{path}",status="{status}"}} {n}')
            lines += ["# TYPE memllm_completion_tokens_total counter", f"memllm_completion_tokens_total {self.tokens}",
                      "# TYPE memllm_in_flight gauge", f"memllm_in_flight {self.in_flight}"]
        for name, n in sorted((engine or {}).items()):  # turns, steps (batched model calls), batch_rows, prefill_calls
            lines += [f"# TYPE memllm_engine_{name}_total counter", f"memllm_engine_{name}_total {n}"]
        return "\n".join(lines) + "\n"
