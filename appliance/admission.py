"""Memory admission: will a model fit before we load it?

A llama.cpp model needs its weights (the file, memory-mapped), a KV cache for the configured context (f16 keys and
values for every layer), compute buffers and the logits buffer. The compute buffer is the largest of the logits of
one micro-batch (``n_vocab x n_ubatch`` floats: 256 MiB for Gemma-3's 262k vocabulary at a batch of 256) and the
attention scores (``n_ctx x n_ubatch x n_head`` floats), plus the feed-forward activations. The formula matches what
llama.cpp 0.3.36 reports for the test models and Gemma-3 within a few percent, erring high; ``memory.margin_mib``
covers the worker process itself.

An RWKV checkpoint is not mapped: the rwkv package reads the whole file and converts every tensor to the strategy's
types, so the estimate is the converted weights (plus a quarter for allocator and TorchScript overhead), a second
copy of the file while it converts, torch itself, and under ``i8`` three float copies of the largest matrix, which it
dequantises on every forward (the temporaries of ``(w + 0.5) * ry * rx + my + mx``). Against the peak RSS of the
backend on a 96M-parameter RWKV-6 checkpoint it errs high by 8-28% under ``cpu fp32``, ``cpu bf16`` and ``cpu fp32i8``
(docs/benchmarks-rwkv.md, written by ``make bench-rwkv``; summarised in docs/models.md). Other sizes and RWKV-7 are
not in that record.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.backends.llama_archs import check_architecture
from appliance.catalog import ModelEntry
from appliance.config.schema import Config
from appliance.errors import InsufficientMemory
from appliance.gguf_meta import Architecture, read_metadata
from appliance.pth_meta import engine_strategy, read_checkpoint
from appliance.sensors import MiB

F16 = 2
F32 = 4
MAX_UBATCH = 512  # llama-cpp-python's default n_ubatch; the micro-batch is min(n_batch, this)
TORCH_RUNTIME = 256 * MiB  # torch and rwkv.model imported: 232 MiB of RSS measured on x86-64
RWKV_OVERHEAD = 1.25  # resident weights over the converted tensors' size (measured 1.04-1.22)
#: MemAvailable when the worker loads its model on a 1 GiB Raspberry Pi (3B, 3B+) running the SD-card image, everything
#: else up: measured on the image booted under QEMU's raspi3b, where Linux gets 960 MiB of the 1 GiB as under the
#: firmware's default GPU share (docs/image.md). `appliance models fit` holds every model against it.
PI_1GIB_AVAILABLE = 728 * MiB


@dataclass(frozen=True)
class Footprint:
    model_id: str
    weights: int
    kv_cache: int
    compute: int
    margin: int
    mapped: bool = True  # the weights are the file's pages (llama.cpp's mmap), reclaimable page cache
    cache_name: str = "KV cache"  # what grows with the context (llama.cpp) or the recurrent state (RWKV)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.margin

    @property
    def anonymous(self) -> int:
        """What is not the memory-mapped file: freed when the model is unloaded, not reclaimable before."""
        return self.kv_cache + self.compute + (0 if self.mapped else self.weights)

    def describe(self) -> str:
        parts = (("weights", self.weights), (self.cache_name, self.kv_cache), ("compute", self.compute),
                 ("margin", self.margin))
        return " + ".join(f"{name} {size / MiB:.0f}" for name, size in parts) + f" = {self.total / MiB:.0f} MiB"


def estimate(entry: ModelEntry, config: Config) -> Footprint | None:
    """Memory the model needs with this config's context and batch size; None for files we cannot read ahead."""
    if entry.path.suffix.lower() == ".pth":
        return _rwkv_estimate(entry, config)
    if entry.path.suffix.lower() != ".gguf":
        return None
    check_architecture(entry.path)  # an architecture llama.cpp cannot run is refused as such, not as a size
    arch = Architecture.from_metadata(read_metadata(entry.path), entry.path)
    n_ctx = config.worker.context_size
    n_ubatch = min(config.worker.batch_size, MAX_UBATCH)
    kv = arch.n_layer * n_ctx * arch.n_head_kv * (arch.head_dim_k + arch.head_dim_v) * F16
    compute = (max(arch.n_vocab * n_ubatch, n_ctx * n_ubatch * arch.n_head) * F32
               + n_ubatch * (8 * arch.n_embd + 3 * arch.n_ff) * F32
               + arch.n_vocab * F32)  # the output (logits) buffer
    return Footprint(model_id=entry.id, weights=entry.path.stat().st_size, kv_cache=kv, compute=compute,
                     margin=config.memory.margin_mib * MiB)


def _rwkv_estimate(entry: ModelEntry, config: Config) -> Footprint:
    checkpoint = read_checkpoint(entry.path)
    strategy = engine_strategy(entry.strategy or config.worker.rwkv_strategy, checkpoint.version)
    dequantised = 3 * checkpoint.largest_matrix() * F32 if "i8" in strategy else 0
    return Footprint(model_id=entry.id, weights=int(checkpoint.runtime_bytes(strategy) * RWKV_OVERHEAD),
                     kv_cache=checkpoint.state_bytes(),
                     compute=TORCH_RUNTIME + entry.path.stat().st_size + dequantised + checkpoint.n_vocab * F32,
                     margin=config.memory.margin_mib * MiB, mapped=False, cache_name="state")


def check(footprint: Footprint, available: int, *, budget_set: bool) -> None:
    """Raise InsufficientMemory, naming needed and available MiB and the keys that change the outcome."""
    if footprint.total <= available:
        return
    source = "memory.budget_mib" if budget_set else "MemAvailable"
    raise InsufficientMemory(
        f"model '{footprint.model_id}' needs about {footprint.total / MiB:.0f} MiB ({footprint.describe()}) but "
        f"{available / MiB:.0f} MiB are available ({source}); {_smaller(footprint)}, or override with "
        f"memory.budget_mib (or memory.admission = false)")


def on_a_1gib_pi(footprint: Footprint) -> str:
    """Whether the model fits a 1 GiB Pi with this config, from what the image leaves free there (measured)."""
    spare = PI_1GIB_AVAILABLE - footprint.total
    there = f"on a 1 GiB Pi (3B, 3B+: {PI_1GIB_AVAILABLE / MiB:.0f} MiB free for a model)"
    if spare >= 0:
        return f"{there}: fits, {spare / MiB:.0f} MiB to spare"
    return f"{there}: TOO BIG by {-spare / MiB:.0f} MiB; {_smaller(footprint)}"


def _smaller(footprint: Footprint) -> str:
    if not footprint.mapped:
        return "choose a smaller strategy (the entry's strategy or worker.rwkv_strategy)"
    return "lower worker.context_size or worker.batch_size"
