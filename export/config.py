"""What `lstmgen export` makes of a checkpoint (ExportConfig), torch-free so that the command's help
needs no torch. The graph builders and the parity check take their defaults from here."""
from __future__ import annotations

from dataclasses import dataclass

from lstmgen.config_args import option

DEFAULT_OPSET = 17
DEFAULT_STEPS = 200  # parity check: greedy tokens per row (text), frames stepped (frames)


@dataclass(frozen=True)
class ExportConfig:
    opset: int = option(DEFAULT_OPSET, "ONNX opset of the graphs (14 or newer)")
    # the whole-sequence graph: prompt.onnx (text) or sequence.onnx (frames)
    prompt_graph: bool = option(True, "write prompt.onnx / sequence.onnx (--no-prompt-graph: servers then feed "
                                      "prompts or sequences through the step graph)")
    verify: bool = option(True, "check ONNX Runtime against PyTorch (--no-verify: skip the parity checks)")
    verify_steps: int = option(DEFAULT_STEPS, "greedy tokens generated per row (frames stepped, for a frame model) "
                                              "during verification", metavar="N")
    # text in the model's vocabulary; None: fixed random ids
    verify_prompt: str | None = option(None, "prompt text for verification (unset: fixed random token ids)",
                                       metavar="TEXT")
    int8: bool = option(False, "ship int8 dynamically quantized graphs (ORT DynamicQuantizeLSTM; LSTM models "
                               "only); verified fp32 first, then int8 agreement is measured, not enforced")
