"""The synchronous engine: ``step()`` schedules a batch, runs one forward pass, chooses
tokens and advances every request's mode. Plain Python around one model call, so tests
can drive it step by step on the CPU."""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from kernels import ops as kernel_ops

from server.config import EngineConfig
from server.engine.client import QueueFullError
from server.engine.cpu_threads import configure_cpu_threads
from server.engine.grammar import GrammarCompiler
from server.engine.images import ImageSpan, locate_images
from server.engine.cost_model import CostModel, recurring_tokens
from server.engine.kv_cache import KVCacheManager
from server.engine.metrics_sink import MetricsSink, NullMetrics
from server.engine.modes import get_mode, load_model_defaults, resolve_decode, work_kind_names
from server.engine.outputs import FinishReason, RequestOutput
from server.engine.params import ParamError, RequestParams, ResolveContext, ResolvedParams
from server.engine.penalties import apply_logit_controls
from server.engine.request import Request
from server.engine.runner import ModelRunner
from server.engine.sampler import RowSpec, select_tokens
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.work import Work
from server.model.loader import load_model, parse_dtype
from server.model.image_processing import ImageInputs, PreparedImage
from server.model.model import DecoderModel

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def end_of_turn_ids(tokenizer: Any, model_dir: str) -> frozenset[int]:
    """Token ids that end a generation besides config.json's eos: the tokenizer's EOS and
    generation_config.json's eos_token_id (chat models often end turns with another token)."""
    ids: set[int] = set()
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    return frozenset(ids)


class LLMEngine:
    """The synchronous engine over one model.

    Invariants: every live request is in ``requests`` and in exactly one of the scheduler's
    queues; its params were resolved once, by ``resolve_params``, on admission; a request
    leaves ``requests`` exactly when its final output (``finished=True``) is produced, and
    its KV pages are freed by then. Not thread-safe: one thread (``AsyncEngine``'s) drives it.
    """

    def __init__(
        self, model: DecoderModel, config: EngineConfig, tokenizer: Any = None, metrics: MetricsSink | None = None
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = metrics or NullMetrics()
        mc = model.config
        self.model_config = mc
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            configure_cpu_threads(config.cpu_threads)
        # one GEMM for q/k/v and one for gate/up; on the CPU the fused path's ops are
        # kernels.cpu_ops (the references' math) and bf16/fp16 weights get oneDNN layouts
        # (the head's only when the decoder is compiled: inductor packs the layers' own)
        compile_cpu = config.cpu_compile and self.device.type == "cpu"
        if not model.fused_kernels:
            model.fuse_projections()
            if not kernel_ops.use_triton(self.device):
                model.prepack_cpu_weights(layers=not compile_cpu)
        self.max_model_len = min(config.max_model_len or 8192, mc.max_position_embeddings)
        kv_tokens = config.kv_cache_tokens or self._default_kv_tokens()
        num_pages = -(-kv_tokens // config.page_size)
        if num_pages * config.page_size < self.max_model_len:
            raise ValueError(
                f"the KV cache ({num_pages * config.page_size} tokens) cannot hold one sequence of "
                f"max_model_len={self.max_model_len}"
            )
        self.kv = KVCacheManager(num_pages, config.page_size, config.enable_prefix_caching)
        self.cost_model = CostModel()  # pass times on this device, acceptance so far: read by mode=auto
        self.param_context = ResolveContext(
            block_size=mc.block_size,
            max_model_len=self.max_model_len,
            max_pass_tokens=config.max_num_batched_tokens,
            mask_token_id=mc.mask_token_id if mc.is_diffusion else None,
            server_defaults={} if config.default_refine_steps is None else {"refine_steps": config.default_refine_steps},
            model_defaults=load_model_defaults(config.model),
            cost_model=self.cost_model,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting), self.kv
        )
        graphs = self.device.type == "cuda" and config.use_cuda_graphs
        buckets = tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= config.max_num_seqs)
        self.runner = ModelRunner(
            model,
            num_pages,
            config.page_size,
            self.device,
            next(model.parameters()).dtype,
            max_pages_per_seq=-(-self.max_model_len // config.page_size),
            # AR decode; block passes, and a block plus diffusion's guess row (guess_seed); a
            # quadratic self_spec cycle at the default draft length
            graph_query_lens=(1, mc.block_size, mc.block_size + 1, mc.block_size * (mc.block_size + 1)) if graphs else (),
            graph_batch_sizes=buckets if graphs else (),
            cpu_compile=compile_cpu,
        )
        self.scheduler.on_preempt = lambda req: self.metrics.on_preemption(req.params.decode.mode)
        self._prefix_seen = (0, 0)  # (queried, hit) tokens already reported to metrics
        self._vision_seen = (0, 0.0)  # (images encoded, encoder seconds) already reported
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.eos_ids = frozenset(mc.eos_token_ids) | end_of_turn_ids(tokenizer, config.model)
        self.image_inputs = self._image_inputs()
        self.num_steps = 0
        self.last_step_duration = 0.0
        self._grammars: GrammarCompiler | None = None

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar compiler (built at the first constrained request)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_ids)
        return self._grammars

    @classmethod
    def from_pretrained(cls, config: EngineConfig, metrics: MetricsSink | None = None) -> "LLMEngine":
        from server.model.loader import load_tokenizer

        device = resolve_device(config.device)
        dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
        model = load_model(config.model, device=device, dtype=parse_dtype(dtype))
        try:
            tokenizer = load_tokenizer(config.model)
        except Exception as exc:  # a checkpoint without tokenizer files still serves token ids
            logger.warning("no tokenizer loaded from %s: %s", config.model, exc)
            tokenizer = None
        return cls(model, config, tokenizer, metrics)

    def _default_kv_tokens(self) -> int:
        mc = self.model_config
        bytes_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * next(self.model.parameters()).element_size()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1 - self.config.gpu_memory_utilization)
            return max(self.max_model_len, int(budget // bytes_per_token))
        return max(2 * self.max_model_len, min(65536, (1 << 30) // bytes_per_token))

    # ------------------------------------------------------------ requests
    def resolve_params(self, params: RequestParams) -> ResolvedParams:
        """Fill every decoding default and check the request against this model (ParamError)."""
        self._check_token_ids(params)
        return ResolvedParams(params.sampling, resolve_decode(params.decode, params.sampling, self.param_context))

    def _check_token_ids(self, params: RequestParams) -> None:
        """Token ids a request names must be in this model's vocabulary."""
        s = params.sampling
        vocab = self.model_config.vocab_size
        if any(t >= vocab for t in s.stop_token_ids):
            raise ParamError("stop_token_ids", f"stop_token_ids must be token ids in [0, {vocab})")
        if any(t >= vocab for t, _ in s.controls.logit_bias):
            raise ParamError("logit_bias", f"logit_bias keys must be token ids in [0, {vocab})")

    def _image_inputs(self) -> ImageInputs | None:
        """How the API turns images into prompt tokens (None: the model takes no images, or
        its tokenizer lacks the image tokens, in which case only token-id prompts carry images)."""
        vision = self.model_config.vision
        if vision is None or self.tokenizer is None:
            return None
        try:
            return ImageInputs.for_model(vision, self.tokenizer, self.config.model)
        except ValueError as exc:
            logger.warning("image inputs disabled: %s", exc)
            return None

    def _image_spans(self, prompt_ids: list[int], images: list[PreparedImage] | None) -> list[ImageSpan]:
        """Place the images on the prompt's placeholder tokens; ValueError if they do not fit."""
        vision = self.model_config.vision
        if vision is None or vision.image_token_id is None:
            if images:
                raise ValueError("this model does not accept images")
            return []
        spans = locate_images(prompt_ids, list(images or []), vision.image_token_id)
        for span in spans:
            if span.end - span.start > self.config.max_num_batched_tokens:
                raise ValueError(
                    f"an image of {span.end - span.start} prompt tokens exceeds the per-step token budget "
                    f"({self.config.max_num_batched_tokens}); it cannot be prefilled in one chunk"
                )
        return spans

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: RequestParams, images: list[PreparedImage] | None = None
    ) -> Request:
        """Admit a request (ValueError / ParamError for bad input, QueueFullError when full).
        ``images`` (vision-language models) fill the prompt's image placeholder tokens in order."""
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the context length is {self.max_model_len}"
            )
        resolved = self.resolve_params(params)
        spans = self._image_spans(prompt_ids, images)
        s = resolved.sampling
        stop = set(s.stop_token_ids) | (set() if s.ignore_eos else set(self.eos_ids))
        req = Request(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=resolved,
            seed=s.seed if s.seed is not None else random.getrandbits(63),
            stop_ids=frozenset(stop),
            max_model_len=self.max_model_len,
            arrival_order=next(self._arrivals),
            images=spans,
        )
        req.stats.model = self.config.model
        req.stats.forward_passes = dict.fromkeys(work_kind_names(), 0)
        if s.grammar is not None:
            req.grammar = self.grammars.compile(s.grammar).matcher()
        try:
            self.scheduler.add(req)
        except QueueFullError:
            self.metrics.on_queue_rejected(resolved.decode.mode)
            raise
        self.requests[request_id] = req
        return req

    def abort(self, request_id: str, reason: FinishReason = "abort") -> RequestOutput | None:
        """End a request early with ``reason``; its pages are freed at once. Returns its final output."""
        req = self.scheduler.abort(request_id, reason)
        if req is None:
            return None
        out = self._finalize(req)
        self._report_gauges()
        return out

    def _report_gauges(self) -> None:
        sched = self.scheduler
        self.metrics.on_step(self.last_step_duration, len(sched.running), len(sched.waiting), self.kv.usage)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        t0, t_step = time.time(), time.perf_counter()
        batch = self.scheduler.schedule()
        num_tokens = sum(len(work) for _, work in batch)
        queried, hit = self.kv.prefix_queries, self.kv.prefix_hits
        if (queried, hit) != self._prefix_seen:
            self.metrics.on_prefix_cache(queried - self._prefix_seen[0], hit - self._prefix_seen[1])
            self._prefix_seen = (queried, hit)
        outputs: list[RequestOutput] = []
        before = sum(len(req.token_ids) for req, _ in batch)
        if batch:
            logits = self.runner.run(batch)
            specs, owners = [], []
            for k, ((req, work), lg) in enumerate(zip(batch, logits)):
                row_specs = get_mode(req.params.decode.mode).row_specs(req, work)
                assert len(row_specs) == lg.shape[0]
                logits[k] = lg = self._controlled(req, work, row_specs, lg)
                specs.extend(row_specs)
                owners.append(len(row_specs))
            all_logits = torch.cat(logits) if logits else None
            results = select_tokens(all_logits, specs, self.model_config.mask_token_id) if specs else []
            now = time.time()
            start = 0
            for (req, work), lg, n in zip(batch, logits, owners):
                stats = req.stats
                stats.forward_passes[work.kind.name] += 1
                if stats.first_scheduled_time is None:
                    stats.first_scheduled_time = t0
                mode = get_mode(req.params.decode.mode)
                by_kind = stats.passes_by_decoder.setdefault(mode.pass_label(req, work), {})
                by_kind[work.kind.name] = by_kind.get(work.kind.name, 0) + 1
                mode.apply(req, work, results[start : start + n], lg)
                mode.after_pass(req, work, self.kv)
                start += n
                if work.writes_kv and req.num_computed // self.kv.page_size > len(req.table.hashes):
                    self.kv.cache_full_pages(req.table, req.cache_keys, req.num_computed)
                if stats.prefill_done_time is None and req.num_computed >= req.num_prompt:
                    stats.prefill_done_time = now
        for req in self.scheduler.finished_early:
            outputs.append(self._finalize(req))
        self.scheduler.finished_early.clear()
        for req, _ in batch:
            if req.is_finished:
                self.scheduler.finish(req)
                outputs.append(self._finalize(req))
            elif req.new_tokens:
                outputs.append(self._take_output(req))
        self.num_steps += 1
        if batch:  # the whole step, scheduling and bookkeeping included: what a step costs mode=auto
            self.cost_model.pass_time.observe(num_tokens, time.perf_counter() - t_step)
        emitted = max(0, sum(len(req.token_ids) for req, _ in batch) - before)
        staying = [(req, work) for req, work in batch if not req.is_finished]
        # what the next step's choices see: the load that recurs, not this step's prefills
        self.cost_model.pass_time.set_load(sum(recurring_tokens(req, work) for req, work in staying), len(staying),
                                           emitted, len(batch))
        self.last_step_duration = time.time() - t0
        self._report_vision()
        self._report_gauges()
        return outputs

    def _controlled(self, req: Request, work: Work, specs: list[RowSpec], lg: torch.Tensor) -> torch.Tensor:
        """The logits rows of ``work`` after the request's logit controls."""
        controls = req.params.sampling.controls
        if not specs or (not controls.active and req.grammar is None):
            return lg
        sequence = req.token_ids[: req.num_computed] + work.token_ids
        positions = [s.position for s in specs]
        mask_id = self.model_config.mask_token_id
        out = lg
        if controls.active:
            out = apply_logit_controls(lg, controls, sequence, req.num_prompt, positions, req.stop_ids, mask_id)
        if req.grammar is not None:
            out = req.grammar.mask_rows(out, sequence, len(req.token_ids), positions, mask_id)
        return out.to(lg.dtype)
    def _report_vision(self) -> None:
        """Report the images encoded (and the encoder time) since the last report."""
        vision = self.runner.vision
        if vision is None or vision.images_encoded == self._vision_seen[0]:
            return
        images, seconds = vision.images_encoded, vision.encode_seconds
        self.metrics.on_vision_encode(images - self._vision_seen[0], seconds - self._vision_seen[1])
        self._vision_seen = (images, seconds)

    def _take_output(self, req: Request) -> RequestOutput:
        now = time.time()
        if req.new_tokens:
            req.stats.emission_times.append(now)
            if req.stats.first_token_time is None:
                req.stats.first_token_time = now
        out = RequestOutput(
            request_id=req.request_id,
            new_token_ids=req.new_tokens,
            new_logprobs=req.new_logprobs if req.params.sampling.logprobs is not None else None,
        )
        req.new_tokens, req.new_logprobs = [], []
        return out

    def _finalize(self, req: Request) -> RequestOutput:
        out = self._take_output(req)
        out.finished = True
        out.finish_reason = req.finish_reason
        out.stats = req.stats
        self.requests.pop(req.request_id, None)
        self.metrics.on_request_finished(req.stats, req.finish_reason or "abort")
        return out

    # ------------------------------------------------------------- offline
    def generate(
        self,
        prompts: list[list[int]],
        params: RequestParams | list[RequestParams],
        images: list[list[PreparedImage]] | None = None,
    ) -> list[dict[str, Any]]:
        """Run prompts to completion (offline). Returns per prompt the token ids, finish reason
        and stats. ``images[i]`` are prompt i's images (vision-language models)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{next(self._arrivals)}-{i}" for i in range(len(prompts))]
        pending = list(zip(ids, prompts, plist, images or [None] * len(prompts)))[::-1]
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            while pending and len(self.scheduler.waiting) < self.config.max_waiting:  # never overfill the queue
                self.add_request(*pending.pop())
            for out in self.step():
                tokens[out.request_id].extend(out.new_token_ids)
                if out.finished:
                    done[out.request_id] = out
        return [
            {"token_ids": tokens[rid], "finish_reason": done[rid].finish_reason, "stats": done[rid].stats} for rid in ids
        ]

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
