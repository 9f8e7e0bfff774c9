"""Install-level contracts: serving and the client never import torch; generated code is current;
every subcommand has complete --help."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Fails the import of torch outright, so any indirect import shows up as an error.
BLOCK_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("code", [
    "import lstmgen.serve.server, lstmgen.offline.cli, lstmgen.offline.ray_data, lstmgen.serve.cli, lstmgen.cli",
    "import lstmgen_client, lstmgen_client.cli",
    "from lstmgen.cli import main; main(['serve', '--help'])",
    "from lstmgen.cli import main; main(['sample', '--help'])",
    "from lstmgen.cli import main; main(['generate', '--help'])",
])
def test_serving_and_client_never_import_torch(code):
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_client_package_needs_only_grpc_and_protobuf():
    code = ("import sys, lstmgen_client, lstmgen_client.cli\n"
            "mods = {m.split('.')[0] for m in sys.modules}\n"
            "bad = mods & {'numpy', 'onnxruntime', 'onnx', 'torch', 'lstmgen'}\n"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from importlib.metadata import requires

    names = sorted(re.match(r"[A-Za-z0-9_.-]+", d).group(0) for d in requires("lstmgen-client"))
    assert names == ["grpcio", "protobuf"]


@pytest.mark.parametrize("cmd", ["train", "export", "serve", "generate", "sample"])
def test_every_subcommand_has_help(cmd):
    r = subprocess.run([sys.executable, "-m", "lstmgen.cli", cmd, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: lstmgen " + cmd in r.stdout and len(r.stdout.splitlines()) > 5


def test_generated_protobuf_is_current(tmp_path):
    grpc_tools = pytest.importorskip("grpc_tools")
    r = subprocess.run([sys.executable, "tools/gen_proto.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("generator_pb2.py", "generator_pb2_grpc.py", "generator_pb2.pyi"):
        fresh = (tmp_path / name).read_text()
        assert fresh == (ROOT / "clients" / "lstmgen_client" / "v1" / name).read_text(), \
            f"{name} is stale: run `make proto`"
