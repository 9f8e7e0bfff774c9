"""`lstmgen generate --server HOST:PORT --prompt TEXT`: stream generated text to the terminal.

A client-only install (`pip install lstmgen-client`) has the same command as `lstmgen-client generate`
(`main` below; also `python -m lstmgen_client.cli ...`). The load generator is `lstmgen loadtest`, in
the server package: it reads the server's metric names.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="localhost:50051",
                   help="HOST:PORT of a running `lstmgen serve`; several, comma-separated, are balanced round-robin")
    p.add_argument("--prompt", help="text that primes the model ('-' reads stdin); needed unless --info or --state-in")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (server default if unset)")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature (>= 0; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top token's probability")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="Hugging Face repetition penalty over prompt and output, in [0.01, 100] (1: off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="OpenAI frequency penalty per repeat of a generated token, in [-2, 2]")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="OpenAI presence penalty once a token was generated, in [-2, 2]")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="report each token's log-probability and its N most likely alternatives (--json)")
    p.add_argument("--seed", type=int, default=None, help="random seed (server picks one if unset)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--skip-unknown", action="store_true", help="drop prompt characters the model does not know")
    p.add_argument("--state-in", metavar="FILE",
                   help="continue from the state saved in FILE (by --state-out): the prompt is then optional and "
                        "read after it")
    p.add_argument("--state-out", metavar="FILE", help="save the model's state after the generation to FILE")
    p.add_argument("--resume", action="store_true",
                   help="if the stream breaks (server died), continue it from its last state on another server")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of the whole call in seconds")
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt before the generated text")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result instead of streaming")
    p.add_argument("--info", action="store_true", help="print the served model's description and exit")
    add_connection_arguments(p)


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    """TLS and token flags, shared with `lstmgen loadtest`."""
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's root certificates")
    p.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA certificate (implies --tls)")
    p.add_argument("--auth-token-file", metavar="FILE", help="send the file's content as 'authorization: Bearer ...'")


def connection_kwargs(args: argparse.Namespace) -> dict:
    """Client(...) keyword arguments from the flags above."""
    from pathlib import Path

    return dict(tls=args.tls, root_certificates=Path(args.tls_ca).read_bytes() if args.tls_ca else None,
                token=Path(args.auth_token_file).read_text().strip() if args.auth_token_file else None)


def run(args: argparse.Namespace) -> int:
    from lstmgen_client import Client, LstmgenError

    if args.prompt is None and not args.info and not args.state_in:
        print("lstmgen generate: error: --prompt is required (or --info for the model's description, or "
              "--state-in to continue a saved state)", file=sys.stderr)
        return 2
    prompt = sys.stdin.read() if args.prompt == "-" else (args.prompt or "")
    params = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                  frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                  seed=args.seed, greedy=args.greedy, stop=args.stop, skip_unknown=args.skip_unknown,
                  logprobs=args.logprobs is not None, top_logprobs=args.logprobs or 0,
                  return_state=bool(args.state_out))
    try:
        conn = connection_kwargs(args)
        if args.state_in:
            params["state"] = Path(args.state_in).read_bytes()
    except OSError as e:
        print(f"lstmgen generate: {e}", file=sys.stderr)
        return 2
    servers = args.server.split(",") if "," in args.server else args.server
    try:
        with Client(servers, timeout=args.timeout, **conn) as client:
            if args.info:
                info = client.model_info()
                print(json.dumps(info.__dict__, default=lambda o: o.__dict__, indent=2))
                return 0
            if args.json:
                r = client.generate(prompt, resume=args.resume, **params)
                _save_state(args.state_out, r.state)
                fin = asdict(r.finished)
                # the names `lstmgen sample` writes (and the OpenAI API uses)
                out = {"prompt": prompt, "text": r.text, "finish_reason": fin.pop("reason"), **fin}
                if r.logprobs:
                    out["logprobs"] = [asdict(lp) for lp in r.logprobs]
                print(json.dumps(out, ensure_ascii=False))
                return 0
            echo = not args.no_echo
            finished = None
            for chunk in client.generate_stream(prompt, resume=args.resume, **params):
                if echo:  # once the server answered: a refused call prints its error alone
                    sys.stdout.write(prompt)
                    echo = False
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.finished is not None:
                    finished = chunk.finished
                    _save_state(args.state_out, chunk.state)
            sys.stdout.write("\n")
            if finished is not None:
                print(f"[{finished.reason}: {finished.generated_tokens} tokens, prompt {finished.prompt_tokens} "
                      f"tokens, seed {finished.seed}]", file=sys.stderr)
    except LstmgenError as e:
        print(f"lstmgen generate: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _save_state(path: str | None, state: bytes | None) -> None:
    """Write the state atomically: a crash mid-write must not leave half a state to continue from."""
    if path and state:
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_bytes(state)
        os.replace(tmp, path)


COMMANDS = {"generate": ("lstmgen_client.cli", "stream generated text from a running server")}


def main(argv: list[str] | None = None) -> int:
    """The `lstmgen-client` command (clients/pyproject.toml): `generate` without the server package."""
    import importlib

    from lstmgen_client import __version__

    parser = argparse.ArgumentParser(prog="lstmgen-client", description="Client of an lstmgen server (gRPC): "
                                     "generate text. To load-test a server: `lstmgen loadtest` (server package).")
    parser.add_argument("--version", action="version", version=f"lstmgen-client {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)  # no metavar: usage names the commands
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except OSError as e:  # a file the system refused (--state-out), named in the message
        print(f"lstmgen-client {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
