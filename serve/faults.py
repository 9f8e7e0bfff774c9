"""TEST HOOK, not a feature: make every Nth decode step fail, to exercise fault isolation through
the real server (`lstmgen serve --inject-step-failure-every N`, a flag hidden from --help).

The rows in the failing step end with INTERNAL and a log line naming their request ids; every
other request, and the server, carry on. Never set it in production.

Also: `--inject-worker-crash-at-step N` (hidden) makes the Nth decode step raise InjectedCrash,
which no per-iteration guard catches: the worker cannot go on, every stream ends UNAVAILABLE,
health turns NOT_SERVING and the process exits 1. `failing_every` wraps any other function the
worker calls (the sampler, say) for in-process tests of failures outside the model call.
"""
from __future__ import annotations

from lstmgen.errors import UsageError


class InjectedFault(RuntimeError):
    """The failure the hook raises in place of ONNX Runtime's."""


class InjectedCrash(BaseException):
    """Not an Exception, so nothing in the worker's loop contains it: stands for a failure the
    worker cannot go on from."""


def failing_every(fn, every: int):
    """`fn`, except that every `every`-th call raises InjectedFault instead of running it."""
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls % every == 0:
            raise InjectedFault(f"injected failure in {fn.__name__} (test hook: every {every} calls; call {calls})")
        return fn(*args, **kwargs)
    return wrapped


class FaultyEngine:
    """Wraps an Engine; every `every`-th call of `step` raises InjectedFault instead of running,
    and call number `crash_at` raises InjectedCrash (0: never)."""

    def __init__(self, engine, every: int = 0, crash_at: int = 0):
        if every < 0 or crash_at < 0 or not (every or crash_at):
            raise UsageError(f"--inject-step-failure-every and --inject-worker-crash-at-step must be >= 0 "
                             f"and one of them > 0, got {every} and {crash_at}")
        self.engine, self.every, self.crash_at, self.calls = engine, every, crash_at, 0

    def step(self, tokens, state):
        self.calls += 1
        if self.calls == self.crash_at:
            raise InjectedCrash(f"injected worker crash (test hook: decode step {self.calls})")
        if self.every and self.calls % self.every == 0:
            raise InjectedFault(f"injected step failure (test hook: every {self.every} steps; call {self.calls})")
        return self.engine.step(tokens, state)

    def __getattr__(self, name):  # manifest, prefill, zeros, provider, prompt_session: the real engine's
        return getattr(self.engine, name)
