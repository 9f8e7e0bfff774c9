"""`lstmgen bench`: one run, one model, every layer measured side by side.

1. the machine's fp32 matmul rate and the model's ceiling in tokens/s (FLOPs per token from its
   shapes); 2. PyTorch eager generation one request at a time (the seeds' sampling loop);
3. raw ONNX Runtime step throughput at several batch sizes, and beside each step the time the
sampler takes for that batch in every sampling mode asked for; 4. the real gRPC server under 1..256
concurrent streams driven by a separate client process, per sampling mode, against raw ORT at the
same batch; 5. time to first token for a long prompt, cold and when it shares its first 95% with an
earlier prompt (the prefix-state cache); 6. with --state-every N, what returning the state costs:
the server at 64 streams with return_state, and with a state every N tokens, against without.

Random weights give nearly uniform logits, which no trained model has (a nucleus would hold almost
the whole vocabulary). The output layer is scaled until the mean entropy per token matches a
trained model's (word level 4.8 nats, as a PTB model; char level 1.4 nats, as char-rnn on Tiny
Shakespeare); the uniform worst case of the sampler is reported on a line of its own.

Modules by job: config (BenchConfig, the sampling modes), model (the bundle measured), ceiling
(sections 1-2), step (3), server (4, 6) with alone (the scheduler in this process) and counters
(the server's /metrics read as where each iteration went), ttft (5), report (ratios to ceilings),
figure (the plot), run (the sections in turn and the JSON report), cli (`lstmgen bench`). The
names below are imported by tools/ and tests/; each module imports its heavy libraries only when
called.
"""
from lstmgen.tools.bench.alone import scheduler_alone
from lstmgen.tools.bench.ceiling import cpu_model, flops_per_token, matmul_rates, torch_eager
from lstmgen.tools.bench.cli import refuse_overwrite
from lstmgen.tools.bench.config import SAMPLING_MODES, BenchConfig, mode_params
from lstmgen.tools.bench.counters import inside_server, where_it_went
from lstmgen.tools.bench.model import bench_vocab, make_bundle, shape_logits
from lstmgen.tools.bench.figure import plot, plot_series
from lstmgen.tools.bench.report import CEILING, DISTURBED, bounded, median_pair, pair_runs, share
from lstmgen.tools.bench.run import run_bench
from lstmgen.tools.bench.server import load, start_server
from lstmgen.tools.bench.step import RawStep, ort_steps, time_sampling, uniform_worst_case
from lstmgen.tools.bench.ttft import prefix_ttft

__all__ = ["CEILING", "DISTURBED", "SAMPLING_MODES", "BenchConfig", "RawStep", "bench_vocab", "bounded",
           "cpu_model", "flops_per_token", "inside_server", "load", "make_bundle", "matmul_rates", "median_pair",
           "mode_params", "ort_steps", "pair_runs", "plot", "plot_series", "prefix_ttft", "refuse_overwrite",
           "run_bench", "scheduler_alone", "shape_logits", "share", "start_server", "time_sampling",
           "torch_eager", "uniform_worst_case", "where_it_went"]
