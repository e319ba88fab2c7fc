"""The runtime engine: load an engine directory, then step() = schedule, run, sample, post-process."""

from __future__ import annotations

import itertools
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import kiln.kernels  # noqa: F401  (the program calls kiln ops)
from kiln.compiler import inductor
from kiln.config import RuntimeConfig, torch_dtype
from kiln.engine_dir import COMPILED, PROGRAM, TOKENIZER_DIR, WEIGHTS, check_compatible, read_manifest
from kiln.errors import EngineMismatchError, KilnError, RequestError
from kiln.program_files import attach_weights, load_graph
from kiln.progress import Progress
from kiln.runtime import memory_plan, prompts
from kiln.runtime.cuda_graphs import DecodeGraphs
from kiln.runtime.detokenizer import IncrementalDetokenizer
from kiln.runtime.in_flight import PENDING_TOKEN, InFlightStep
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.mm_runner import decode_extras, make_runner
from kiln.runtime.multimodal import MultimodalData, load_pipeline
from kiln.runtime.prompts import Prompt
from kiln.runtime.sampler import make_generator, sample
from kiln.runtime.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from kiln.runtime.sequence import Sequence
from kiln.runtime.step_timer import DECODE, IDLE, MIXED, MIXED_PIPELINED, PIPELINED, StepTimer
from kiln.sampling_params import SamplingParams


@dataclass
class StepUpdate:
    """What one step did for one request: tokens added, text that became final, and whether it ended."""

    seq: Sequence
    new_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""

    @property
    def finished(self) -> bool:
        return self.seq.is_finished


class Engine:
    def __init__(
        self, engine_dir: str | Path, runtime: RuntimeConfig | None = None, *, progress: Progress | None = None
    ) -> None:
        progress = progress or Progress(enabled=False)
        self.path = Path(engine_dir)
        self.runtime = runtime or RuntimeConfig()
        self.manifest = read_manifest(self.path)
        self.device = check_compatible(self.manifest)
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
        # Images -> expanded prompt + features, for engines built from a vision-language checkpoint
        # (loaded before the pool, which is sized with the vision program's peak kept free).
        self.multimodal = load_pipeline(self.path, self.manifest, self.device, self.runtime.use_compiled)
        dtype = torch_dtype(self.build.dtype)
        bs = self.build.tokens_per_block
        num_blocks = self._num_blocks(dtype, program, held_before)
        self.kv_cache = torch.zeros(self._cache_shape(num_blocks), dtype=dtype, device=self.device)
        self.kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=self.runtime.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.kv, max_batch_size=self.build.max_batch_size, max_num_tokens=self.build.max_num_tokens
        )
        self.runner = make_runner(self.manifest.multimodal, program, self.kv_cache, self.kv, self.device)
        # Decode steps replay CUDA graphs (a VLM's program takes its extra inputs from static buffers too).
        if self.device.type == "cuda" and self.runtime.cuda_graphs:
            with progress.stage("capture CUDA graphs", "decode steps"):
                graphs = DecodeGraphs(
                    program,
                    self.kv_cache,
                    max_batch_size=self.build.max_batch_size,
                    max_blocks_per_seq=-(-self.build.seq_len // bs),
                    device=self.device,
                    extras=decode_extras(self.manifest.multimodal, dtype),
                )
                graphs.capture()
            self.runner.graphs = graphs
        self._ids = itertools.count()
        self.sequences: dict[str, Sequence] = {}
        # Called as hook(sequences, logits) after each step that samples; used by accuracy checks.
        self.logits_hook: Callable[[list[Sequence], torch.Tensor], None] | None = None
        self._in_flight: InFlightStep | None = None  # a pipelined decode step whose tokens are unread
        self.step_timer: StepTimer | None = None  # set by callers that want step times (the throughput bench)
        self._last_step: tuple[str, int, int, int] = (IDLE, 0, 0, 0)
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        overlap = self.runtime.overlap_decode
        self.overlap_decode = self.device.type == "cuda" if overlap is None else overlap

    def _load_program(self) -> inductor.Program:
        """The engine's program, compiled or op by op; a damaged file is a clear rebuild message."""
        name = PROGRAM
        try:
            if not zipfile.is_zipfile(self.path / PROGRAM):  # before torch, which logs a traceback of its own
                raise ValueError("not a torch.export archive")
            exported = load_graph(self.path / PROGRAM)
            name = WEIGHTS
            attach_weights(exported, self.path, self.device)
            from kiln.bench.roofline import decode_weight_bytes

            self.weight_bytes = decode_weight_bytes(exported)
            if not self.compiled:
                return inductor.EagerProgram(exported)
            name = COMPILED
            return inductor.load_compiled(exported, self.path / COMPILED)
        except KilnError:
            raise
        except Exception as exc:
            raise EngineMismatchError(
                f"{self.path / name} cannot be loaded ({type(exc).__name__}: {str(exc).strip()[:200]}); "
                "the engine is damaged or incomplete: rebuild it with `kiln build`"
            ) from exc

    def _cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        facts = self.manifest.model
        return (facts.num_layers, 2, num_blocks, self.build.tokens_per_block, facts.num_kv_heads, facts.head_dim)

    def _num_blocks(self, dtype: torch.dtype, program: inductor.Program, held_before: int) -> int:
        facts, build = self.manifest.model, self.build
        blocks_per_seq = -(-build.seq_len // build.tokens_per_block)
        needed = blocks_per_seq * build.max_batch_size
        if self.runtime.num_kv_blocks is not None:
            if self.runtime.num_kv_blocks < blocks_per_seq:
                raise KilnError(
                    f"num_kv_blocks={self.runtime.num_kv_blocks} cannot hold one sequence of max_seq_len "
                    f"{build.seq_len} ({blocks_per_seq} blocks of {build.tokens_per_block} tokens)"
                )
            return self.runtime.num_kv_blocks
        if self.device.type != "cuda":
            # Room for a full batch, twice over so finished prompts stay cached for prefix reuse.
            return 2 * needed
        memory_plan.reclaim(self.device)  # loading's temporaries, cached by the allocator, count as free
        per_block = 2 * facts.num_layers * build.tokens_per_block * facts.num_kv_heads * facts.head_dim * dtype.itemsize
        fraction = self.runtime.kv_cache_memory_fraction
        if fraction is not None:
            free, _total = torch.cuda.mem_get_info(self.device)
            fits = int(free * fraction) // per_block
        else:
            step = memory_plan.step_peak_bytes(
                memory_plan.StepSetup(
                    build,
                    self._cache_shape,
                    dtype,
                    self.device,
                    lambda cache, kv: make_runner(self.manifest.multimodal, program, cache, kv, self.device),
                    memory_plan.ImageRows.of(self.manifest.multimodal),
                )
            )
            if self.multimodal is not None:  # it runs between steps: the larger peak is kept free
                step = max(step, memory_plan.vision_peak_bytes(self.multimodal))
            free, total = torch.cuda.mem_get_info(self.device)  # the step's memory has gone back
            fits = memory_plan.pool_blocks(free, total, step, per_block)
        memory_plan.check_holds_one_sequence(
            fits, blocks_per_seq, free, free - fits * per_block, other_bytes=held_before
        )
        return fits  # beyond a full batch, the rest holds finished prompts for prefix reuse

    # ---- requests -------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt (with the tokenizer's special tokens), or the ids given."""
        return prompts.encode(self.tokenizer, prompt)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation through the checkpoint's chat template, ready for the assistant's turn."""
        return prompts.chat_ids(self.tokenizer, messages)

    def load_tokenizer(self) -> Any:
        """A tokenizer of this engine of its own: HF fast tokenizers must not be shared across threads."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path / TOKENIZER_DIR, local_files_only=True)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        build, vocab = self.build, self.manifest.model.vocab_size
        if not prompt_ids:
            raise RequestError("the prompt is empty: give at least one token")
        if len(prompt_ids) > build.input_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens, more than this engine's max_input_len "
                f"({build.input_len}); shorten it or rebuild with a larger --max-input-len"
            )
        if len(prompt_ids) + params.max_tokens > build.seq_len:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds this engine's "
                f"max_seq_len ({build.seq_len}); lower max_tokens to at most {build.seq_len - len(prompt_ids)}"
            )
        bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        mm: MultimodalData | None = None,
    ) -> Sequence:
        """Queue a request; `mm` comes from `self.multimodal.prepare(...)` for a prompt with images."""
        self.validate(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.sequences:
            raise RequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id=request_id, prompt_ids=list(prompt_ids), params=params, mm=mm)
        if mm is not None:  # blocks holding image tokens are cached under the images' content too
            seq.block_extra_keys = list(mm.block_extra_keys(self.kv.block_size))
        seq.generator = make_generator(params.seed, self.device)
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, params.stop, params.skip_special_tokens, context_ids=prompt_ids[-4:]
        )
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            seq.finish_reason = "abort"
            while seq.output_ids and seq.output_ids[-1] == PENDING_TOKEN:
                seq.output_ids.pop()
            self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step ---------------------------------------------------------------------------------

    def step(self) -> list[StepUpdate]:
        """Schedule, run, sample, post-process; with `overlap_decode`, decode steps are pipelined.

        See `_step`; this wrapper only times the step when `step_timer` is set.
        """
        timer = self.step_timer
        if timer is None:
            return self._step()
        start = time.perf_counter()
        try:
            updates = self._step()
            wall = time.perf_counter() - start
            device_s = None
            if self._events is not None:
                begin, end = self._events
                end.synchronize()
                device_s = begin.elapsed_time(end) / 1000
        finally:  # untimed steps never see these events (they only exist while a timer is set)
            self._events = None
        kind, rows, tokens, preempted = self._last_step
        timer.record(kind, wall, rows, tokens, device_s, preempted)
        return updates

    def _step(self) -> list[StepUpdate]:
        """Schedule, run, sample, post-process; with `overlap_decode`, decode steps are pipelined.

        A pipelined decode step is launched before the previous one's tokens are read: its inputs take
        those tokens straight from the device, each sequence holds a placeholder for its pending token,
        and the previous step's post-processing (detokenizing, stop checks) runs while the device works.
        A sequence that finished meanwhile computed one token too many; that token is dropped.
        """
        plan = self.scheduler.schedule()
        pending, self._in_flight = self._in_flight, None
        overlap = self._can_overlap(plan)
        if self.step_timer is not None:
            self._last_step = self._describe(plan, overlap)
        updates: list[StepUpdate] = []
        if pending is not None and not overlap:
            updates = self._resolve(pending)
            pending = None
            plan.chunks = [c for c in plan.chunks if not c.seq.is_finished]
        if not plan.chunks:
            if not updates and self.scheduler.waiting and not self.scheduler.running:
                raise KilnError("the KV-cache pool cannot hold the next waiting request; raise num_kv_blocks")
            return updates
        if overlap:
            self._in_flight = self._launch(plan.chunks, pending)
            updates = self._resolve(pending) if pending is not None else []
            if all(seq.is_finished for seq in self._in_flight.seqs):  # nothing left to read from it
                self._in_flight = None
            return updates
        if self.step_timer is not None and self.device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        logits, sampled = self.runner.run(plan.chunks)
        for chunk in plan.chunks:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            self.kv.register_computed(seq.request_id, seq.token_slice, seq.num_computed_tokens, seq.block_extra_keys)
        if not sampled:
            if self._events is not None:
                self._events[1].record()
            return updates
        seqs = [plan.chunks[i].seq for i in sampled]
        if self.logits_hook is not None:
            self.logits_hook(seqs, logits)
        tokens, logprobs = sample(
            logits,
            [s.params for s in seqs],
            # prompt + output is only read for the repetition penalty: skip the copy otherwise
            [s.all_ids if s.params.repetition_penalty != 1.0 else () for s in seqs],
            [s.output_ids for s in seqs],
            [s.generator for s in seqs],
        )
        if self._events is not None:
            self._events[1].record()
        now = time.perf_counter()
        for row, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
            updates.append(self._append(seq, token, logprobs[row] if logprobs is not None else None, now))
        return updates

    @staticmethod
    def _describe(plan: SchedulerOutput, overlap: bool) -> tuple[str, int, int, int]:
        """(kind, rows, tokens, preempted) of a planned step, for the step timer."""
        rows, tokens = len(plan.chunks), plan.num_tokens
        if not plan.chunks:
            kind = IDLE
        elif tokens == rows and all(c.completes for c in plan.chunks):
            kind = PIPELINED if overlap else DECODE
        else:
            kind = MIXED_PIPELINED if overlap else MIXED
        return kind, rows, tokens, len(plan.preempted)

    # ---- pipelined decode ---------------------------------------------------------------------------

    def _can_overlap(self, plan: SchedulerOutput) -> bool:
        """A plan of decode rows only, none of which reads its own history (penalties) or log-probs."""
        if not self.overlap_decode or not plan.chunks or plan.preempted or self.logits_hook is not None:
            return False
        for chunk in plan.chunks:
            p = chunk.seq.params
            if chunk.num_tokens != 1 or not chunk.completes:
                return False
            if p.logprobs is not None or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
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
        updates = []
        now = time.perf_counter()
        for seq, index, token in zip(step.seqs, step.indices, step.host_tokens()):
            if seq.is_finished:  # ended at an earlier step: this token was computed past its end
                continue
            updates.append(self._append(seq, token, None, now, index=index))
            if not seq.is_finished:
                self.kv.register_computed(
                    seq.request_id, seq.token_slice, seq.num_computed_tokens, seq.block_extra_keys
                )
        return updates

    def _append(self, seq: Sequence, token: int, logprob: Any, now: float, index: int | None = None) -> StepUpdate:
        """Add a sampled token (or fill the placeholder at `index`) and decide whether the sequence ends."""
        update = StepUpdate(seq, [token])
        if index is None:
            seq.output_ids.append(token)
            index = len(seq.output_ids) - 1
        else:
            seq.output_ids[index] = token
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.first_token_time is None:
            seq.first_token_time = now
        params = seq.params
        is_eos = token in self.eos_ids and not params.ignore_eos
        if not is_eos and token not in params.stop_token_ids and params.detokenize:
            update.delta_text = seq.detokenizer.push(token)
        reason: str | None = None
        if is_eos:
            reason = "stop"
        elif token in params.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        elif seq.detokenizer.stopped:
            reason, seq.stop_reason = "stop", seq.detokenizer.stop_reason
        elif index + 1 >= params.max_tokens or len(seq.prompt_ids) + index + 1 >= self.build.seq_len:
            reason = "length"
        if reason is not None:
            del seq.output_ids[index + 1 :]  # a placeholder of a step still in flight
            if not seq.detokenizer.stopped and params.detokenize:
                update.delta_text += seq.detokenizer.flush()
            seq.finish_reason = reason
            seq.finish_time = now
            self.scheduler.finish(seq)
        return update
