"""One base class for the errors a user can act on (lstmgen/errors.py), looked up through the
class hierarchy on the gRPC side and caught once on the CLI side; anything else shows as a bug."""
from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from lstmgen.errors import UserError
from lstmgen.serve.errors import GenerationError, InvalidRequest, Overloaded, Unauthenticated
from lstmgen.serve.service import rejection_reason, status_for


class PromptTooLong(InvalidRequest):
    """A more specific request error, as a later change might add."""


class OverloadedForTenant(Overloaded):
    pass


@pytest.mark.parametrize("error,code,reason", [
    (PromptTooLong("prompt", "too long"), grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
    (OverloadedForTenant("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"),
    (Unauthenticated("no token"), grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"),
    (GenerationError("unclassified"), grpc.StatusCode.INTERNAL, None),
    (ValueError("a bug"), grpc.StatusCode.INTERNAL, None),
])
def test_status_and_rejection_follow_the_class_hierarchy(error, code, reason):
    assert status_for(error) == code
    assert rejection_reason(error) == reason


def test_user_facing_errors_share_one_base():
    from lstmgen.bundle import BundleError
    from lstmgen.evaluate import EvalError
    from lstmgen.export.bundle import ExportError
    from lstmgen.export.parity import ParityError
    from lstmgen.serve.server import BindError
    from lstmgen.text import TextError
    from lstmgen.train.checkpoint import CheckpointError
    from lstmgen.train.data import DataError
    from lstmgen.train.trainer import TrainError
    from lstmgen.vocab import UnknownTokensError

    for cls in (BundleError, EvalError, ExportError, ParityError, CheckpointError, DataError, TrainError,
                UnknownTokensError, GenerationError, BindError, TextError):
        assert issubclass(cls, UserError), cls


# A subcommand module written for this test: `run` raises what argv[2] names.
_CMD = """
import sys
import lstmgen.cli as cli
from lstmgen.errors import UsageError

def add_arguments(p):
    p.add_argument("kind")

def run(args):
    if args.kind == "user":
        raise UsageError("--flag: 3 is out of range")
    if args.kind == "os":
        open("/nonexistent/lstmgen-test-file")
    raise ValueError("a bug in lstmgen")

cli.SUBCOMMANDS["probe"] = ("__main__", "test probe")  # this very script
sys.exit(cli.main(["probe", sys.argv[1]]))
"""


@pytest.mark.parametrize("kind", ["user", "os", "bug"])
def test_cli_tidies_user_errors_and_shows_bugs(kind):
    r = subprocess.run([sys.executable, "-c", _CMD, kind], capture_output=True, text=True, timeout=60)
    if kind == "bug":  # a plain ValueError is a bug: its traceback, exit 1
        assert r.returncode == 1 and "Traceback" in r.stderr and "ValueError: a bug in lstmgen" in r.stderr
        return
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lstmgen probe: error: "), r.stderr
    assert ("--flag: 3 is out of range" if kind == "user" else "/nonexistent/lstmgen-test-file") in lines[0]

