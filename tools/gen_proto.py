"""Regenerate clients/lstmgen_client/v1 from proto/ (`make proto`; `gen_proto.py DIR` writes to DIR).

protoc names a file descriptor by the file's path on its include path. With `-Iproto` that is
`lstmgen/v1/generator.proto`, as in the repository: the name reflection serves, and the one a
tool that also loads the repository's file expects. The Python modules still live in the client
package (`lstmgen_client.v1`, not `lstmgen.v1`), so the two lines that name them by import path
are rewritten.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO = "lstmgen/v1/generator.proto"
OUT = ROOT / "clients" / "lstmgen_client" / "v1"
# file -> (protoc's line, ours); each must occur exactly once, so a protoc change fails loudly
REWRITES = {
    "generator_pb2.py": ("DESCRIPTOR, 'lstmgen.v1.generator_pb2', _globals)",
                         "DESCRIPTOR, 'lstmgen_client.v1.generator_pb2', _globals)"),
    "generator_pb2_grpc.py": ("from lstmgen.v1 import generator_pb2 as",
                              "from lstmgen_client.v1 import generator_pb2 as"),
}


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else OUT  # another folder: tests compare it with the committed files
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{Path(protoc.__file__).parent / '_proto'}",
                          f"--python_out={tmp}", f"--grpc_python_out={tmp}", f"--pyi_out={tmp}",
                          str(ROOT / "proto" / PROTO)])
        if rc != 0:
            print(f"protoc failed ({rc})", file=sys.stderr)
            return rc
        gen = Path(tmp) / "lstmgen" / "v1"
        for name, (old, new) in REWRITES.items():
            text = (gen / name).read_text()
            if text.count(old) != 1:
                print(f"{name}: expected one {old!r} in protoc's output", file=sys.stderr)
                return 1
            (gen / name).write_text(text.replace(old, new))
        for name in ("generator_pb2.py", "generator_pb2_grpc.py", "generator_pb2.pyi"):
            shutil.copyfile(gen / name, out / name)
            print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
