"""TEST HOOK, not a feature: make every Nth decode step fail, to exercise fault isolation through
the real server (`lstmgen serve --inject-step-failure-every N`, a flag hidden from --help).

The rows in the failing step end with INTERNAL and a log line naming their request ids; every
other request, and the server, carry on. Never set it in production.
"""
from __future__ import annotations


class InjectedFault(RuntimeError):
    """The failure the hook raises in place of ONNX Runtime's."""


class FaultyEngine:
    """Wraps an Engine; every `every`-th call of `step` raises InjectedFault instead of running."""

    def __init__(self, engine, every: int):
        if every < 1:
            raise ValueError(f"--inject-step-failure-every must be >= 1, got {every}")
        self.engine, self.every, self.calls = engine, every, 0

    def step(self, tokens, h, c):
        self.calls += 1
        if self.calls % self.every == 0:
            raise InjectedFault(f"injected step failure (test hook: every {self.every} steps; call {self.calls})")
        return self.engine.step(tokens, h, c)

    def __getattr__(self, name):  # manifest, prime, zeros, provider, prompt_session: the real engine's
        return getattr(self.engine, name)
