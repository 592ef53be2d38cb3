"""Weight streaming: how drawbot moves DiffSynth's weights between host memory and the GPU (engine mode `stream`).

DiffSynth keeps its model classes, converters and pipeline steps; only the way weights move changes. DiffSynth's own
low-VRAM path casts every streamed layer fp8->bf16 on the CPU and copies it as bf16 from pageable memory, blocking,
and evicts everything after each request (shared notes, performance.md §4). Here instead:

- A model is cut into *units* that run one after another (the DiT's 19 double + 38 single blocks; T5's embedding
  and 24 blocks). Each unit's weights are packed into one flat byte range of a single host allocation, kept in their
  storage dtype (float8_e4m3fn for the DiT), page-locked once (`cudaHostRegister`, exact size).
- As many units as the VRAM budget allows stay *resident* on the GPU, for good (never evicted between requests); their
  host copies are handed back to the OS. They are chosen spread out through the execution order, so that each
  streamed unit's copy overlaps the compute of the resident units around it. The plan comes from measured sizes:
  unit bytes, and the device-wide peak of one calibration generation (below); the VAE decodes in tiles when an
  untiled decode would be the peak.
- Every other unit is *streamed*: a ring of a few GPU slot buffers, filled on a side CUDA stream in execution order;
  unit k's forward waits (on the GPU, not the host) for its copy, and the slot is refilled with the next streamed
  unit as soon as unit k's kernels are queued, ordered after them by an event. The ring runs on across denoising
  steps, so the next step's first units arrive while the current step finishes.
- Upcasting stays where DiffSynth does it: its `AutoWrappedLinear` casts the weight to bf16 right before the matmul;
  since the weight already sits on the GPU, that cast runs on the GPU, through `Upcaster` (a Triton kernel, 2.3-2.6x
  torch's fp8->bf16 copy on an H200, checked against torch before first use; torch's copy where Triton is missing).
  Biases and tiny wrapped layers (norm scales) are kept in the compute dtype, which skips a cast kernel per bias and
  DiffSynth's per-call deep copy of norm modules (same values: fp8->bf16 is exact).
- The plan is made from the device-wide peak (what nvidia-smi shows: CUDA context, cuBLAS/cuDNN workspaces and the
  allocator's cache included) sampled during the calibration generation, so the budget holds for the whole card.
  That generation, and the one at a second size that compiles the shape-generic graphs, run *weightless*: streamed
  units compute on zeroed slots and nothing is read, since what they allocate and what torch.compile traces depends
  on shapes, never on values. The resident units' bytes (and, file-backed, the units the page cache keeps) are read
  in a thread of their own while the second one compiles.
- Compute modes: `torch.compile` of the DiT blocks (one graph per block class; the hooks above stay outside it; on
  by default where it can run, see `enable_streaming`) and, opt-in, float8 compute (`Float8Linears`: the blocks'
  linears multiply the float8 weights as stored with `torch._scaled_mm`, activations quantized per token on the
  GPU). Measured on an H200 at 12 GB, 1024² (run 9): 0.203 s/step eager bf16, 0.146 compiled (the default), 0.112
  compiled with float8 compute (bench/README.md).

`synchronous=True` runs the same code with blocking copies on the compute stream and no prefetch: the reference
that the streamed path must match bit for bit (a race would show as a difference).

The package, one job per module: `host_memory` (the host allocation, bounded loading), `kernels` (Triton upcast and
quantization), `float8` (float8 linears), `streamer` (unit layout, slot ring, `ModelStreamer`), `planning`
(residency), `pipeline` (DiffSynth glue, compile switching, the weightless start-up), `tiled_decode` (the VAE decode
in tiles when the plan needs it), `weight_cache` (file-backed weights), `prompt_cache` (a repeated prompt skips the
text encoders: without it every request streams T5 again) and `patches` (every attribute set on a DiffSynth object
goes through one recorder that can undo it). Written here rather than taken from a library because this is the
product's edge: no offloading library keeps the weights in float8 end to end, plans residency from a measured device
peak, and runs under torch.compile (bench/README.md compares diffusers' group offloading and DiffSynth's own).
"""

from engine import compat

compat.apply()  # before the first diffsynth import

from engine.streaming.float8 import Float8Linears, fp8_unsupported_reason  # noqa: E402
from engine.streaming.host_memory import (LOAD_MAPPED_PARAMS, LOAD_TRIM_INTERVAL_S, PAGE, HostMemory,  # noqa: E402
                                          frugal_loading, page_align, return_freed_host_memory)
from engine.streaming.kernels import (FP8_MAX, FP8_MIN_ROWS, FP8_SCALE_FLOOR, Upcaster,  # noqa: E402
                                      dequantize_rows, fp8_codes_to_bf16_bits, quantize_rows)
from engine.streaming.patches import Patches  # noqa: E402
from engine.streaming.pipeline import (PipelineStreaming, StartupSeconds, compiled_graphs,  # noqa: E402
                                       enable_streaming, is_compile_failure)
from engine.streaming.planning import (DECODE_TILES, DEFAULT_MARGIN_GB, DevicePeak, MemoryReport,  # noqa: E402
                                       choose_resident)
from engine.streaming.prompt_cache import PromptCache, install_prompt_cache  # noqa: E402
from engine.streaming.streamer import ALIGNMENT, DEFAULT_SLOTS, ModelStreamer, SlotPool  # noqa: E402

__all__ = [
    "ALIGNMENT", "DECODE_TILES", "DEFAULT_MARGIN_GB", "DEFAULT_SLOTS", "FP8_MAX", "FP8_MIN_ROWS", "FP8_SCALE_FLOOR",
    "LOAD_MAPPED_PARAMS", "LOAD_TRIM_INTERVAL_S", "PAGE", "DevicePeak", "Float8Linears", "HostMemory", "MemoryReport",
    "ModelStreamer", "Patches", "PipelineStreaming", "PromptCache", "SlotPool", "StartupSeconds", "Upcaster",
    "choose_resident", "compiled_graphs", "dequantize_rows", "enable_streaming", "fp8_codes_to_bf16_bits", "fp8_unsupported_reason", "frugal_loading",
    "install_prompt_cache", "is_compile_failure", "page_align", "quantize_rows", "return_freed_host_memory",
]
