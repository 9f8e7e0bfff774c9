"""The prefix cache through a real server: a prompt that shares its beginning with an earlier one
skips that part, and gets exactly the text it gets without the cache."""
from __future__ import annotations

import re
import urllib.request

from conftest import CHAR_TEXT, start_server
from lstmgen_client import Client

PROMPT = (CHAR_TEXT * 3)[:300]


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_hit_gives_the_text_of_a_miss(bundles, tmp_path):
    cached = start_server(bundles["char"], tmp_path / "cached.log", "--prefix-cache-every", "16",
                          "--metrics-port", "0", "--max-prompt-chars", "2000")
    plain = start_server(bundles["char"], tmp_path / "plain.log", "--prefix-cache-mb", "0")
    try:
        port = int(re.search(r"metrics on http://[\d.]+:(\d+)", cached.ready_line).group(1))
        params = dict(max_new_tokens=40, temperature=0.8, top_p=0.9, top_k=40, seed=5)
        with Client(cached.target) as c, Client(plain.target) as p:
            c.generate(PROMPT, **params)  # fills the cache
            assert metric(port, "lstmgen_prefix_cache_entries") >= 300 // 16 - 1
            hits = metric(port, "lstmgen_prefix_cache_hits_total")
            variant = PROMPT[:250] + "Second Citizen: we are accounted poor citizens"
            for prompt in (variant, PROMPT):
                got = c.generate(prompt, **params)
                assert got.text == p.generate(prompt, **params).text
                assert got.finished.prompt_tokens == len(prompt)
            assert metric(port, "lstmgen_prefix_cache_hits_total") == hits + 2
            # 250 shared characters: the checkpoint at 240; the whole prompt again: at 288 (< 299)
            assert metric(port, "lstmgen_prefix_cache_tokens_saved_total") >= 240 + 288
    finally:
        cached.stop()
        plain.stop()
    assert "Traceback" not in (tmp_path / "cached.log").read_text()
