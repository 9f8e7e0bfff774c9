"""What users read: no internals (reprs, torch's loader, test hooks), flag names that exist, and the
same names and defaults across commands."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from conftest import CHAR_TEXT, make_checkpoint
from lstmgen.cli import build_parser, main


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60)


def test_export_speaks_of_checkpoints_not_of_torch(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert main(["export", str(text), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an lstmgen checkpoint" in err and str(text) in err
    assert "index" not in err and "weights_only" not in err.lower()

    ckpt = make_checkpoint(tmp_path / "c.pt", "char", CHAR_TEXT)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "b"), "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "ExportConfig" not in out and "opset 17, fp32, with its whole-sequence graph, not verified" in out


def test_serve_logs_a_readable_config_without_unset_test_hooks(char_server):
    from lstmgen.serve.cli import config_from_args, describe

    def described(*flags: str) -> str:
        return describe(config_from_args(build_parser("serve").parse_args(["serve", "b", *flags])))

    plain = described()
    assert "{" not in plain and "inject" not in plain and "bundle b; grpc 0.0.0.0:50051" in plain
    assert "TEST HOOKS inject_step_failure_every 3" in described("--inject-step-failure-every", "3")
    assert "waits up to 8 decode steps" in plain and "waits up to 2 decode steps" in described("--prefill-wait-steps", "2")
    logged = char_server.log.read_text()
    assert "config: bundle " in logged and "inject" not in logged and "{'" not in logged


def test_generate_info_json_and_the_client_command(char_server):
    info = run_module("lstmgen.cli", "generate", "--server", char_server.target, "--info")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["level"] == "char"
    # a client-only install: `lstmgen-client generate` is `python -m lstmgen_client.cli generate`
    r = run_module("lstmgen_client.cli", "generate", "--server", char_server.target, "--prompt", "First",
                   "--max-new-tokens", "5", "--seed", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "length" and "reason" not in out and out["generated_tokens"] == 5
    bare = run_module("lstmgen_client.cli")
    assert bare.returncode == 2 and "generate" in bare.stderr  # usage, not silence
    r = run_module("lstmgen_client", "generate", "--server", char_server.target, "--prompt", "Zebra\u20ac")
    assert r.returncode == 2 and "--skip-unknown" in r.stderr and "Traceback" not in r.stderr
    r = run_module("lstmgen_client.cli", "generate", "--server", char_server.target)
    assert r.returncode == 2 and "--prompt is required" in r.stderr


def test_top_level_help_is_whole_sentences(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1].replace("\n", " ")
    assert description.endswith(".") and "describes each command" in description


@pytest.mark.parametrize("command", ["loadtest", "generate", "eval", "train", "serve", "export", "data"])
def test_every_flag_has_help(command):
    sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
    missing = [a.option_strings or a.dest for a in sub.choices[command]._actions if not a.help]
    assert not missing


def test_eval_defaults_to_auto_and_skips_unknown_chars(tmp_path, bundles, capsys):
    eval_parser = build_parser("eval")
    assert eval_parser.parse_args(["eval", "b", "--data", "f"]).device == "auto"
    odd = tmp_path / "odd.txt"
    odd.write_text("First Citizen: \u20ac speak\n" * 20)
    assert main(["eval", str(bundles["char"]), "--data", str(odd), "--quiet"]) == 2
    assert "--skip-unknown" in capsys.readouterr().err
    assert main(["eval", str(bundles["char"]), "--data", str(odd), "--skip-unknown", "--device", "cpu",
                 "--batch-size", "2", "--log-format", "json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.splitlines()[-1])
    assert result["skipped"] == 20 and result["bpc"] > 0 and "20 unknown symbols skipped" in result["message"]


def test_serve_refuses_a_negative_prompt_wait_before_loading_anything(capsys, tmp_path):
    assert main(["serve", str(tmp_path / "no-bundle"), "--prefill-wait-steps", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--prefill-wait-steps must be >= 0 (got -1)" in err


@pytest.mark.parametrize("flag, value, says", [
    ("--message-budget", "0", "--message-budget must be a positive number of messages a second (got 0)"),
    ("--min-message-interval-ms", "nan", "--min-message-interval-ms a number >= 0 (got nan)"),
    ("--prefill-chunk", "0", "--prefill-chunk must be >= 1 (got 0)"),
])
def test_serve_refuses_pacing_and_prefill_values_that_would_fail_later(capsys, tmp_path, flag, value, says):
    """Values that divided by zero in the pacing or stalled the prefill are one line at start-up."""
    assert main(["serve", str(tmp_path / "no-bundle"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err
