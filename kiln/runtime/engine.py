"""The runtime engine: load an engine directory, then step() = schedule, run, sample, update, process outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import kiln.kernels  # noqa: F401  (the program calls kiln ops)
from kiln.config import RuntimeConfig, kv_cache_torch_dtype, torch_dtype
from kiln.engine.manifest import ENCODER_DIR, WorldFacts, check_compatible, read_manifest
from kiln.engine.programs import Program, load_program
from kiln.engine.tokenizers import load_tokenizer
from kiln.errors import KilnError, RequestError
from kiln.kernels.selection import from_configs, selected
from kiln.progress import Progress
from kiln.runtime import distributed, grammar, memory_plan, prompt_logprobs, prompts, stats, validation
from kiln.runtime.cuda_graphs import DecodeGraphs
from kiln.runtime.encoder_runner import EncoderDecoderRunner, request_ids
from kiln.runtime.in_flight import PENDING_TOKEN, InFlightStep
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.mm_runner import decode_extras, make_runner
from kiln.runtime.multimodal import MultimodalData, load_pipeline
from kiln.runtime.output_processor import OutputProcessor, StepUpdate
from kiln.runtime.prompt_logprobs import prompt_spans
from kiln.runtime.prompts import Prompt
from kiln.runtime.sampler import make_generator, sample
from kiln.runtime.scheduler import ScheduledChunk, Scheduler, SchedulerOutput, StepOutput
from kiln.runtime.sequence import Sequence
from kiln.runtime.stats import EngineStats
from kiln.runtime.step_observer import StepObserver, describe
from kiln.runtime.validation import Request
from kiln.sampling_params import SamplingParams

__all__ = ["Engine", "EngineStats", "Request", "StepUpdate"]


class Engine:
    def __init__(
        self, engine_dir: str | Path, runtime: RuntimeConfig | None = None, *, progress: Progress | None = None
    ) -> None:
        progress = progress or Progress(enabled=False)
        self.path = Path(engine_dir)
        self.runtime = runtime or RuntimeConfig()
        self.manifest = read_manifest(self.path)
        # A tensor-parallel engine: this process is one rank of a torchrun launch (set before the device check).
        world = self.manifest.world
        self.rank = None
        if world is not None:
            self.rank = distributed.join(
                world,
                self.manifest.device["type"],
                self.runtime.collective_timeout_s,
                dtype=torch_dtype(self.manifest.build.dtype),
                vocab_size=self.manifest.model.vocab_size,
                layout=distributed.StepLayout.of(self.manifest.multimodal),
            )
        self.device = check_compatible(self.manifest)
        # The kernels this engine's ops run: selected around its measured step, its graph capture and each step.
        self.kernels = from_configs(self.runtime, self.manifest.build)
        held_before = 0  # bytes of GPU tensors this process held before this engine (for the out-of-memory error)
        if self.device.type == "cuda":
            memory_plan.reclaim(self.device)  # a dropped engine in a reference cycle must not hold the GPU
            held_before = torch.cuda.memory_allocated(self.device)
        self.build = self.manifest.build
        facts = self.manifest.model
        self.eos_ids = frozenset(facts.eos_token_ids)
        with progress.stage("load engine", str(self.path)):
            self.tokenizer: Any = self.load_tokenizer()
            self.compiled = bool(self.manifest.compiled and self.runtime.use_compiled)
            self.weight_bytes = 0  # bytes of weights a decode step reads, set when the program loads
            program = self._load_program()
            # An encoder-decoder engine: its encoder program, and the runner that runs both programs.
            self.encoder_decoder = self.manifest.encoder_decoder
            encoder = None
            if self.encoder_decoder is not None:
                compiled = self.compiled and self.encoder_decoder.encoder_compiled
                ops = self.manifest.op_modules
                encoder = load_program(self.path / ENCODER_DIR, self.device, compiled=compiled, op_modules=ops).program
        # Images -> expanded prompt + features, for engines built from a vision-language checkpoint
        # (loaded before the pool, which is sized with the vision program's peak kept free).
        # With several ranks only rank 0 runs the vision program; the image rows go out with each step's inputs.
        leads = self.rank is None or self.rank.leads
        self.multimodal = None
        if leads:
            self.multimodal = load_pipeline(self.path, self.manifest, self.device, self.runtime.use_compiled)
        dtype = torch_dtype(self.build.dtype)
        bs = self.build.tokens_per_block
        mm_spec = self.manifest.multimodal
        # An encoder-decoder request's cache holds its encoder input before its decoder tokens.
        encoder_len = self.encoder_decoder.max_encoder_input_len if self.encoder_decoder is not None else 0
        self.max_cached = self.build.seq_len + encoder_len

        def runner(cache: torch.Tensor, kv: KVCacheManager) -> Any:
            if encoder is not None:
                image_hidden = mm_spec.hidden_size if mm_spec is not None else None
                assert self.encoder_decoder is not None
                return EncoderDecoderRunner(
                    program,
                    encoder,
                    cache,
                    kv,
                    self.device,
                    encoder_len,
                    image_hidden,
                    self.encoder_decoder.decoder_prompt,
                )
            return make_runner(mm_spec, program, cache, kv, self.device)

        setup = memory_plan.StepSetup(
            dataclasses.replace(self.build, max_seq_len=self.max_cached),
            self._cache_shape,
            dtype,
            self.device,
            runner,
            memory_plan.ImageRows.of(mm_spec),
            cache_dtype=kv_cache_torch_dtype(self.build),
        )
        with selected(self.kernels):  # the plan measures a step
            num_blocks = memory_plan.num_blocks(
                setup, facts, self.runtime, vision=self.multimodal, held_before=held_before
            )
        if self.rank is not None:  # every rank's pool holds the same blocks
            num_blocks = distributed.agree_on_blocks(num_blocks, self.device)
        # On CPU an inference tensor: the attention ops that write it then skip torch's Python
        # version-counter kernel (ADInplaceOrView), about 70 µs a call. Only steps (inference mode) write it.
        with torch.inference_mode() if self.device.type == "cpu" else contextlib.nullcontext():
            self.kv_cache = torch.zeros(self._cache_shape(num_blocks), dtype=setup.kv_dtype, device=self.device)
        prefix_caching = self.runtime.enable_prefix_caching and encoder is None  # cross keys see the whole input
        self._kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=prefix_caching)
        self._scheduler = Scheduler(
            self._kv,
            max_batch_size=self.build.max_batch_size,
            max_num_tokens=self.build.max_num_tokens,
            eos_ids=self.eos_ids,
            max_seq_len=self.max_cached,
            max_scored_tokens=prompt_logprobs.SCORED_TOKENS_PER_STEP,
        )
        self.runner = runner(self.kv_cache, self._kv)
        # Decode steps replay CUDA graphs (a VLM's program takes its extra inputs from static buffers too;
        # an encoder-decoder engine's decoder program its encoder lengths).
        if self.rank is not None:  # rank 0 broadcasts each step; the other ranks follow it and exit here
            if not self.rank.leads:
                distributed.follow(program, self.kv_cache, self.rank)
                raise SystemExit(0)
            self.runner.program = distributed.LeaderProgram(program, self.rank)
            self.runner.microbatches = self.rank.world.pp_size
        # Not yet with several ranks: each captured step must hold its collectives (checked on the GPU machine).
        if self.device.type == "cuda" and self.runtime.cuda_graphs and self.rank is None:
            with progress.stage("capture CUDA graphs", "decode steps"), selected(self.kernels):
                graphs = DecodeGraphs(
                    program,
                    self.kv_cache,
                    max_batch_size=self.build.max_batch_size,
                    max_blocks_per_seq=-(-self.max_cached // bs),
                    device=self.device,
                    extras=decode_extras(self.manifest.multimodal, dtype) if encoder is None else None,
                    encoder_decoder=encoder is not None,
                    cross_spans=self.encoder_decoder is not None and self.encoder_decoder.decoder_prompt,
                )
                graphs.capture()
            self.runner.graphs = graphs
        prompt_len = self.max_cached - self.build.seq_len + self.build.input_len  # encoder input + decoder prefix
        self.limits = validation.RequestLimits(prompt_len, self.max_cached, facts.vocab_size)
        self._outputs = OutputProcessor(self.tokenizer)
        self._grammars = grammar.Grammars(self.tokenizer, facts.vocab_size, self.eos_ids)  # structured output
        self._ids = itertools.count()
        self._requests: dict[str, Sequence] = {}  # added, not yet finished or aborted
        # Called as hook(sequences, logits) after each step that samples; used by accuracy checks.
        self.logits_hook: Callable[[list[Sequence], torch.Tensor], None] | None = None
        self._in_flight: InFlightStep | None = None  # a pipelined decode step whose tokens are unread
        self.step_observer: StepObserver | None = None  # told about each step (the throughput bench's StepTimer)
        overlap = self.runtime.overlap_decode
        self.overlap_decode = self.device.type == "cuda" if overlap is None else overlap

    def release_ranks(self) -> None:
        """A tensor-parallel engine's rank 0: tell the other ranks this engine is done (they leave `Engine(...)`).
        Done at exit anyway; nothing for a one-rank engine."""
        if isinstance(self.runner.program, distributed.LeaderProgram):
            self.runner.program.stop()

    def _load_program(self) -> Program:
        """The engine's program, compiled or op by op; a damaged file is a clear rebuild message."""
        directory = self.path if self.rank is None else self.path / WorldFacts.rank_dir(self.rank.rank)
        loaded = load_program(directory, self.device, compiled=self.compiled, op_modules=self.manifest.op_modules)
        self.weight_bytes = loaded.weight_bytes
        return loaded.program

    def _cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        facts, world = self.manifest.model, self.manifest.world
        if world is None:
            return (facts.num_layers, 2, num_blocks, self.build.tokens_per_block, facts.num_kv_heads, facts.head_dim)
        layers = facts.num_layers // world.pp_size
        return (layers, 2, num_blocks, self.build.tokens_per_block, world.kv_heads_per_rank, facts.head_dim)

    # ---- requests -------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt (with the tokenizer's special tokens), or the ids given."""
        return prompts.encode(self.tokenizer, prompt)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation through the checkpoint's chat template, ready for the assistant's turn."""
        return prompts.chat_ids(self.tokenizer, messages)

    def load_tokenizer(self) -> Any:
        """A tokenizer of this engine of its own: HF fast tokenizers must not be shared across threads."""
        return load_tokenizer(self.path)

    def validate(self, prompt_ids: list[int], params: SamplingParams, mm: MultimodalData | None = None) -> Request:
        """The request checked against this engine's limits (reads only them: safe on any thread).
        An encoder-decoder engine's prompt is its encoder input; the decoder starts from the model's start token."""
        if self.encoder_decoder is not None:
            if params.prompt_logprobs is not None:
                raise RequestError("prompt_logprobs: an encoder-decoder engine does not score its encoder input")
            full_ids, encoder_input = request_ids(list(prompt_ids), self.encoder_decoder, mm)
            decoder_len = len(full_ids) - encoder_input.length + params.max_tokens
            if decoder_len > self.build.seq_len:
                what = "prompt" if self.encoder_decoder.decoder_prompt else "decoder's start tokens"
                raise RequestError(
                    f"the {what} + max_tokens ({decoder_len}) exceed this engine's max_seq_len "
                    f"({self.build.seq_len}); lower max_tokens"
                )
            return validation.validate(full_ids, params, self.limits, encoder_input)
        return validation.validate(prompt_ids, params, self.limits, mm)

    def add_request(self, request: Request, request_id: str | None = None) -> Sequence:
        """Queue a request that `validate` returned; its `mm` comes from `self.multimodal.prepare(...)`."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        params, mm = request.params, request.mm
        seq = Sequence(request_id=request_id, prompt_ids=list(request.prompt_ids), params=params, mm=mm)
        if mm is not None:  # blocks holding image tokens are cached under the images' content too
            seq.block_extra_keys = list(mm.block_extra_keys(self._kv.block_size))
        seq.generator = make_generator(params.seed, self.device)
        if params.guided is not None:
            seq.grammar = self._grammars.matcher(params.guided)
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]
        self._outputs.add(seq)
        self._requests[request_id] = seq
        self._scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        """End a request (reason "abort") and free its blocks; the sequence, or None for an unknown id."""
        seq = self._requests.pop(request_id, None)
        if seq is not None:
            self._scheduler.abort(seq)
        return seq

    def running_request_ids(self) -> list[str]:
        """Ids of the requests in the running batch (those a failed step was running)."""
        return [seq.request_id for seq in self._scheduler.running]

    def has_unfinished(self) -> bool:
        return self._scheduler.has_work()

    def stats(self) -> EngineStats:
        return stats.collect(self._scheduler, self._kv, len(self._requests))

    # ---- one step ---------------------------------------------------------------------------------

    def step(self) -> list[StepUpdate]:
        """Schedule, run, sample, update from the output, process outputs (with this engine's kernels).

        With `overlap_decode`, decode steps are pipelined: a step is launched before the previous
        one's tokens are read (its inputs take them straight from the device, each sequence holds a
        placeholder for its pending token), and the previous step's results are applied while the
        device works. A sequence that finished meanwhile computed one token too many; it is dropped.
        """
        with selected(self.kernels):
            return self._step()

    def _step(self) -> list[StepUpdate]:
        observer = self.step_observer
        if observer is not None:
            observer.step_started()
        finished = self._scheduler.num_finished
        plan = self._scheduler.schedule()
        pending, self._in_flight = self._in_flight, None
        overlap = self._can_overlap(plan)
        info = describe(plan, overlap) if observer is not None else None
        updates: list[StepUpdate] = []
        if pending is not None and not overlap:
            updates = self._resolve(pending)
            pending = None
            plan.chunks = [c for c in plan.chunks if not c.seq.is_finished]
        if overlap:
            self._in_flight = self._launch(plan.chunks, pending)
            updates = self._resolve(pending) if pending is not None else []
            if all(seq.is_finished for seq in self._in_flight.seqs):  # nothing left to read from it
                self._in_flight = None
        elif plan.chunks:
            updates += self._run(plan.chunks)
        elif not updates and self._scheduler.waiting and not self._scheduler.running:
            raise KilnError("the KV-cache pool cannot hold the next waiting request; raise num_kv_blocks")
        if self._scheduler.num_finished != finished:  # the callers hold the sequences; the engine forgets them
            for update in updates:
                if update.finished:
                    self._requests.pop(update.seq.request_id, None)
        if observer is not None and info is not None:
            observer.step_finished(info)
        return updates

    def _run(self, chunks: list[ScheduledChunk]) -> list[StepUpdate]:
        """Run and sample a step that is not pipelined, then apply its tokens."""
        observer = self.step_observer
        if observer is not None:
            observer.device_started()
        spans = prompt_spans(chunks)
        logits, sampled = self.runner.run(chunks)
        if spans:
            prompt_logprobs.record(chunks, spans, logits[len(sampled) :])
            logits = logits[: len(sampled)]
        if not sampled:
            if observer is not None:
                observer.device_finished()
            return self._update(StepOutput(chunks), time.perf_counter())
        seqs = [chunks[i].seq for i in sampled]
        if self.logits_hook is not None:
            self.logits_hook(seqs, logits)
        grammars = [s.grammar for s in seqs] if any(s.grammar is not None for s in seqs) else None
        if grammars is not None:  # the rows' allowed tokens, filled on the host while the device works
            logits = self._grammars.mask_logits(logits, grammars)
        tokens, logprobs = sample(
            logits,
            [s.params for s in seqs],
            # prompt + output is only read for the repetition penalty: skip the copy otherwise
            [s.all_ids if s.params.repetition_penalty != 1.0 else () for s in seqs],
            [s.output_ids for s in seqs],
            [s.generator for s in seqs],
        )
        if observer is not None:
            observer.device_finished()
        now = time.perf_counter()
        token_ids = tokens.tolist()
        if grammars is not None:
            grammar.advance(grammars, token_ids)
        return self._update(StepOutput(chunks, seqs, token_ids, None, logprobs), now)

    def _update(self, out: StepOutput, now: float) -> list[StepUpdate]:
        placed = self._scheduler.update_from_output(out, self._outputs.push, now)
        return self._outputs.process(placed)

    # ---- pipelined decode ---------------------------------------------------------------------------

    def _can_overlap(self, plan: SchedulerOutput) -> bool:
        """A plan of decode rows only, none of which reads its own history (penalties, a grammar) or log-probs."""
        if not self.overlap_decode or not plan.chunks or plan.preempted or self.logits_hook is not None:
            return False
        for chunk in plan.chunks:
            p = chunk.seq.params
            if chunk.num_tokens != 1 or not chunk.completes or chunk.seq.needs_prompt_logits:
                return False
            if p.logprobs is not None or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                return False
            if chunk.seq.grammar is not None:  # its next mask needs this step's token
                return False
        return True

    def _launch(self, chunks: list[ScheduledChunk], pending: InFlightStep | None) -> InFlightStep:
        patch = None
        if pending is not None:  # inputs still being sampled: take them from the device
            row_of = {id(seq): row for row, seq in enumerate(pending.seqs)}
            pairs = [(j, row_of[id(c.seq)]) for j, c in enumerate(chunks) if c.seq.output_ids[-1] == PENDING_TOKEN]
            patch = ([j for j, _ in pairs], [row for _, row in pairs], pending.tokens)
        logits, _ = self.runner.run(chunks, patch)
        seqs = [c.seq for c in chunks]
        for chunk in chunks:
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
        empty: list[tuple[int, ...]] = [() for _ in seqs]
        tokens, _ = sample(logits, [s.params for s in seqs], empty, empty, [s.generator for s in seqs])
        indices = []
        for seq in seqs:
            indices.append(len(seq.output_ids))
            seq.output_ids.append(PENDING_TOKEN)
        return InFlightStep.start(seqs, indices, tokens)

    def _resolve(self, step: InFlightStep) -> list[StepUpdate]:
        """Read a pipelined step's tokens into its sequences' placeholders and apply them."""
        now = time.perf_counter()
        return self._update(StepOutput(seqs=step.seqs, tokens=step.host_tokens(), indices=step.indices), now)
