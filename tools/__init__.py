"""lstmgen.tools: the tools home, everything around lstmgen that no serving or training path needs.

`lstmgen.tools.bench` (`lstmgen bench`: every serving layer measured side by side in one run),
`lstmgen.tools.demo` (`make demo`), `lstmgen.tools.loadgen` (`lstmgen loadtest`) with
`lstmgen.tools.scrape` (reading a server's /metrics), and the one-off measurement scripts beside
them, run as `python tools/NAME.py`. Installed with the server package, not with the client: the
load generator reads the server's metric names. Nothing here is imported at `import lstmgen.tools`.
"""
