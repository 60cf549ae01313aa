"""Capture of intermediate-layer residual states inside vLLM's Worker, in compiled mode.

Measured (docs/capture.md): forward hooks never fire once vLLM has compiled the
model, and a Python hook traced into the graph replays trace-time constants. What works is a
registered custom op, placed in the decoder layer's forward before the warm-up compile, that
copies the layer's residual stream into a persistent buffer it declares as mutated. The op is
opaque to Inductor, so its body runs on every step.

Pooling happens outside the graph, right after each forward (a wrapper on the runner's
`_model_forward`), where the step's request ids and row offsets are known. Per request and
per layer it keeps, on the device: the instruction vector (row at position P-1), the running
sum and count of response rows (positions >= P) for mean pooling, and the last response row.
Nothing is copied to the host until the frontend fetches a finished request over
`collective_rpc`.

Definitions shared with training (the encode path goes through the same code):
- P is the prompt length, or `extra_args["srr_response_start"]` when the engine is asked to
  encode prompt + given response as one prompt.
- Response rows are the positions >= P that were fed through the model. The last sampled
  token of a generation is never fed, so a candidate that ends in EOS has exactly its text's
  tokens as response rows, the same rows the encode path sees for that text.
- An empty response pools to the instruction row.
- Prefix means: the mean of the first t response rows, for each t in PREFIX_TOKENS, kept when
  the t-th row is pooled (a response shorter than t has its full mean there). They are what
  a candidate's score is computed from while it is still being generated (`srr_peek`), and
  what the prefix calibration is fitted on, so the two read the same rows.

Activated only in processes where SRR_CAPTURE_LAYERS is set (the vLLM plugin entry point
loads in every vLLM process, plain `vllm serve` included).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

LAYERS_ENV = "SRR_CAPTURE_LAYERS"
TAG_KEY = "srr_tag"
RESPONSE_START_KEY = "srr_response_start"
ORPHAN_SECONDS = 300.0
# Response lengths at which the running mean is kept: where a partial score can be taken.
PREFIX_TOKENS = (8, 16, 32)


@torch.library.custom_op("srr::capture", mutates_args=("sink", "calls"))
def capture_op(hidden: torch.Tensor, residual: torch.Tensor | None, sink: torch.Tensor,
               calls: torch.Tensor) -> None:
    # Tensor work only, no host state: under CUDA graph replay the Python body does not run,
    # but the kernels it launched at capture time (shapes fixed per graph) replay as recorded.
    n = min(hidden.shape[0], sink.shape[0])
    # vLLM defers the residual add to the next layer's norm: the stream is their sum.
    if residual is None:
        sink[:n].copy_(hidden[:n])
    else:
        torch.add(hidden[:n], residual[:n], out=sink[:n])
    calls.add_(1)  # proves the op ran inside the compiled graph (or its replay)


@capture_op.register_fake
def _(hidden, residual, sink, calls) -> None:
    return None


class CaptureLayer(nn.Module):
    """Wraps one decoder layer; returns its output unchanged and copies the stream out."""

    def __init__(self, inner: nn.Module, sink: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("srr_sink", sink, persistent=False)
        self.register_buffer("srr_calls", torch.zeros(1, dtype=torch.long, device=sink.device),
                             persistent=False)

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        hidden, residual = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
        torch.ops.srr.capture(hidden, residual, self.srr_sink, self.srr_calls)
        return out


def parse_layers(spec: str) -> list[int]:
    return sorted({int(x) for x in spec.replace(" ", "").split(",") if x})


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h"):
            return module
    raise RuntimeError("SRR capture: no decoder layer list found in the model")


def split_request_id(rid: str) -> tuple[str, int]:
    """Engine ids are '{tag}-{rand8}', or '{index}_{tag}-{rand8}' for the children of n > 1."""
    base = rid.rsplit("-", 1)[0] if "-" in rid else rid
    if "_" in base:
        idx, tag = base.split("_", 1)
        if idx.isdigit():
            return tag, int(idx)
    return base, 0


class CaptureState:
    """Per-request pooled states for the captured layers, kept on the model's device."""

    def __init__(self, runner: Any, layers: list[int]):
        self.runner = runner
        self.layers = layers
        model = runner.get_model()
        decoder = find_decoder_layers(model)
        width = runner.model_config.get_hidden_size()
        device = runner.device
        rows = runner.scheduler_config.max_num_batched_tokens
        self.sinks = []
        self.calls = []
        for layer in layers:
            if not 0 <= layer < len(decoder):
                raise ValueError(f"SRR capture: layer {layer} out of range 0..{len(decoder) - 1}")
            sink = torch.zeros(rows, width, dtype=torch.float32, device=device)
            decoder[layer] = CaptureLayer(decoder[layer], sink)
            self.sinks.append(decoder[layer].srr_sink)
            self.calls.append(decoder[layer].srr_calls)
        self.device = device
        self.width = width
        self.slot_of: dict[str, int] = {}
        self.meta: dict[int, tuple[str, str, int]] = {}  # slot -> (rid, tag, index)
        self.done: set[str] = set()  # fetched or released ids whose late rows are ignored
        self.orphan_since: dict[str, float] = {}
        self.steps_without_capture = 0
        self.tokens_seen = 0
        self._alloc(max(64, runner.scheduler_config.max_num_seqs))
        logger.info("SRR capture installed on layers %s (width %d)", layers, width)

    def _alloc(self, n: int) -> None:
        shape = (n, len(self.layers), self.width)
        z = lambda *s, **k: torch.zeros(*s, device=self.device, **k)  # noqa: E731
        self.sum, self.last, self.instr = z(shape), z(shape), z(shape)
        self.prefix = z(n, len(PREFIX_TOKENS), len(self.layers), self.width)
        self.count = z(n, dtype=torch.long)
        self.rows = z(n, dtype=torch.long)
        self.seen = torch.full((n,), -1, dtype=torch.long, device=self.device)
        self.has_instr = z(n, dtype=torch.bool)
        self.start = z(n, dtype=torch.long)
        self.free = list(range(n - 1, -1, -1))

    def _grow(self) -> None:
        old = (self.sum, self.last, self.instr, self.prefix, self.count, self.rows, self.seen,
               self.has_instr, self.start)
        n = old[0].shape[0]
        self._alloc(2 * n)
        for new, prev in zip((self.sum, self.last, self.instr, self.prefix, self.count, self.rows,
                              self.seen, self.has_instr, self.start), old):
            new[:n] = prev
        self.free = list(range(2 * n - 1, n - 1, -1))

    def _slot(self, rid: str) -> int:
        slot = self.slot_of.get(rid)
        if slot is not None:
            return slot
        if rid in self.done:
            return -1
        req = self.runner.requests.get(rid)
        params = getattr(req, "sampling_params", None)
        extra = (params.extra_args or {}) if params is not None else {}
        if TAG_KEY not in extra:
            return -1
        if not self.free:
            self._reclaim()
        if not self.free:
            self._grow()
        slot = self.free.pop()
        start = int(extra.get(RESPONSE_START_KEY) or req.num_prompt_tokens)
        self.sum[slot] = 0
        self.count[slot] = 0
        self.rows[slot] = 0
        self.seen[slot] = -1
        self.has_instr[slot] = False
        self.start[slot] = start
        tag, index = split_request_id(rid)
        self.slot_of[rid] = slot
        self.meta[slot] = (rid, tag, index)
        return slot

    def _reclaim(self) -> None:
        """Free slots of requests the runner dropped long ago and nobody fetched (leaks).

        A finished request leaves the runner a step before the frontend fetches it, so only
        states unclaimed for ORPHAN_SECONDS count as leaked.
        """
        now = time.monotonic()
        for rid in [r for r in self.slot_of if r not in self.runner.requests]:
            since = self.orphan_since.setdefault(rid, now)
            if now - since > ORPHAN_SECONDS:
                self._drop(rid)

    def _drop(self, rid: str) -> None:
        self.orphan_since.pop(rid, None)
        slot = self.slot_of.pop(rid)
        del self.meta[slot]
        self.free.append(slot)
        self.done.add(rid)

    def after_forward(self, positions: torch.Tensor | None) -> None:
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        if num_reqs == 0 or positions is None:
            return
        calls_before = getattr(self, "_calls", 0)
        self._calls = int(self.calls[0])
        if self._calls == calls_before:
            # The op did not run: a stale compile cache or a path that bypassed it.
            self.steps_without_capture += 1
            return
        req_ids = batch.req_ids[:num_reqs]
        qsl = self.runner.query_start_loc.np[: num_reqs + 1]
        counts = np.diff(qsl)
        n = int(qsl[-1])
        self.tokens_seen += n
        if self.done:
            self.done = {r for r in self.done if r in self.runner.requests}
        slots_list = [self._slot(rid) for rid in req_ids]
        if max(slots_list) < 0:
            return
        if n > self.sinks[0].shape[0]:
            raise RuntimeError(f"SRR capture: step of {n} rows exceeds the capture buffer")
        dev = self.device
        slots = torch.tensor(slots_list, dtype=torch.long).to(dev)
        counts_t = torch.from_numpy(counts).to(dev)
        row_slot = torch.repeat_interleave(slots, counts_t)
        valid = row_slot >= 0
        safe_slot = row_slot.clamp(min=0)
        pos = positions[:n].to(torch.long)
        start = self.start[safe_slot]
        hs = torch.stack([s[:n] for s in self.sinks], dim=1)  # [n, layers, width]

        self.rows.index_add_(0, safe_slot[valid], torch.ones_like(pos[valid]))
        is_instr = valid & (pos == start - 1)
        self.instr[row_slot[is_instr]] = hs[is_instr]
        self.has_instr[row_slot[is_instr]] = True
        # Preemption recomputes rows already pooled: `seen` keeps the sum exact.
        resp = valid & (pos >= start) & (pos > self.seen[safe_slot])
        self._keep_prefixes(resp, row_slot, hs)
        self.sum.index_add_(0, row_slot[resp], hs[resp])
        self.count.index_add_(0, row_slot[resp], torch.ones_like(pos[resp]))
        last_rows = torch.from_numpy(qsl[1:] - 1)[counts > 0].to(dev)
        last_rows = last_rows[resp[last_rows]]
        self.last[row_slot[last_rows]] = hs[last_rows]
        self.seen[row_slot[last_rows]] = pos[last_rows]

    def _keep_prefixes(self, resp: torch.Tensor, row_slot: torch.Tensor, hs: torch.Tensor) -> None:
        """Before this step's rows join the sums: for every slot whose t-th response row is
        in this step, keep the mean of its first t rows. A request's rows are contiguous
        and in order, so a slot's response rows here are one run, after `count` earlier ones."""
        idx = resp.nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        slots = row_slot[idx]
        m = idx.numel()
        ar = torch.arange(m, device=idx.device)
        first = torch.ones(m, dtype=torch.bool, device=idx.device)
        first[1:] = slots[1:] != slots[:-1]
        run_start = torch.cummax(torch.where(first, ar, 0), 0).values
        ordinal = self.count[slots] + (ar - run_start) + 1  # this row is the ordinal-th
        lengths = torch.tensor(PREFIX_TOKENS, device=idx.device)
        hit, hit_j = (ordinal[:, None] == lengths).nonzero(as_tuple=True)  # a few per step at most
        for r, j, slot, a in zip(hit.tolist(), hit_j.tolist(), slots[hit].tolist(), run_start[hit].tolist()):
            self.prefix[slot, j] = (self.sum[slot] + hs[idx[a: r + 1]].sum(0)) / PREFIX_TOKENS[j]

    def _prefixes(self, slot: int, mean: torch.Tensor) -> torch.Tensor:
        """[len(PREFIX_TOKENS), layers, width]: the kept prefix means, the current mean where
        the response has not reached that length."""
        reached = torch.tensor([int(self.count[slot]) >= t for t in PREFIX_TOKENS], device=self.device)
        return torch.where(reached[:, None, None], self.prefix[slot], mean.unsqueeze(0))

    def _mean(self, slot: int) -> tuple[int, torch.Tensor]:
        """The slot's response rows so far, and their mean (the instruction state before any)."""
        count = int(self.count[slot])
        return count, self.sum[slot] / count if count else self.instr[slot]

    def peek(self, tags: list[str], prefix: int) -> list[dict]:
        """While the requests run: per candidate, its response rows so far and its mean at
        PREFIX_TOKENS[prefix] (its current mean while shorter). Frees nothing."""
        wanted = set(tags)
        out = []
        for slot in self.slot_of.values():
            _, tag, index = self.meta[slot]
            if tag not in wanted:
                continue
            count, mean = self._mean(slot)
            out.append({"tag": tag, "index": index, "ok": bool(self.has_instr[slot]),
                        "response_rows": count, "instr": _bytes(self.instr[slot]),
                        "mean": _bytes(self._prefixes(slot, mean)[prefix])})
        return out

    def fetch(self, tags: list[str], release_only: bool = False) -> list[dict]:
        wanted = set(tags)
        out = []
        for rid in [r for r, s in self.slot_of.items() if self.meta[s][1] in wanted]:
            slot = self.slot_of[rid]
            _, tag, index = self.meta[slot]
            if not release_only:
                count, mean = self._mean(slot)
                out.append({
                    "tag": tag, "index": index, "ok": bool(self.has_instr[slot]),
                    "response_rows": count, "rows": int(self.rows[slot]),
                    "instr": _bytes(self.instr[slot]), "mean": _bytes(mean),
                    "last": _bytes(self.last[slot] if count else self.instr[slot]),
                    "prefixes": _bytes(self._prefixes(slot, mean)),
                })
            self._drop(rid)
        return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.float().cpu().numpy().tobytes()


class CaptureWorkerExtension:
    """Mixed into vLLM's Worker (`worker_extension_cls`); called through collective_rpc.

    Results are plain types and bytes: without vLLM's insecure serialization setting, arrays
    over 256 bytes come back as stubs.
    """

    def _srr(self) -> CaptureState:
        state = getattr(self.model_runner, "_srr_capture", None)
        if state is None:
            raise RuntimeError(f"SRR capture is not installed ({LAYERS_ENV} unset in the worker)")
        return state

    def srr_info(self) -> dict:
        s = self._srr()
        return {"layers": s.layers, "width": s.width, "op_calls": int(s.calls[0]),
                "steps_without_capture": s.steps_without_capture,
                "tokens_seen": s.tokens_seen, "open": len(s.slot_of)}

    def srr_fetch(self, tags: list[str]) -> list[dict]:
        return self._srr().fetch(tags)

    def srr_peek(self, tags: list[str], prefix: int) -> list[dict]:
        return self._srr().peek(tags, prefix)

    def srr_release(self, tags: list[str]) -> int:
        return len(self._srr().fetch(tags, release_only=True))


def _wrap_load_model(original):
    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if getattr(self, "_srr_capture", None) is None:
            self._srr_capture = CaptureState(self, parse_layers(os.environ[LAYERS_ENV]))

    return load_model


def _wrap_model_forward(original):
    def _model_forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        state = getattr(self, "_srr_capture", None)
        if state is not None:
            state.after_forward(kwargs.get("positions"))
        return out

    return _model_forward


def register() -> None:
    """vLLM `general_plugins` entry point: runs in every vLLM process before the model loads."""
    if not os.environ.get(LAYERS_ENV):
        return
    from vllm.v1.worker import gpu_model_runner

    runners = [gpu_model_runner.GPUModelRunner]
    try:
        from vllm.v1.worker import cpu_model_runner

        runners.append(cpu_model_runner.CPUModelRunner)
    except ImportError:
        pass
    for cls in runners:
        if "load_model" in vars(cls) and not getattr(cls.load_model, "_srr", False):
            cls.load_model = _wrap_load_model(cls.load_model)
            cls.load_model._srr = True
    base = gpu_model_runner.GPUModelRunner
    if not getattr(base._model_forward, "_srr", False):
        base._model_forward = _wrap_model_forward(base._model_forward)
        base._model_forward._srr = True
