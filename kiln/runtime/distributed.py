"""Tensor- and pipeline-parallel engines under torchrun: join the ranks, then rank 0 runs the engine and
every other rank follows it. Each step, rank 0 broadcasts the program's packed inputs (a header over a
CPU "control" group that may wait as long as the server idles, the inputs over the default group, which
waits at most `RuntimeConfig.collective_timeout_s`); every rank runs its own program on its own KV pool.
Tensor parallel: the collectives inside the programs combine the ranks. Pipeline parallel: a step's
sequences go in micro-batches; each stage receives a micro-batch's hidden states from the previous one
and sends its own on without waiting, the last sends its logits back to rank 0, so that stage 0 computes
the next micro-batch while the later stages work on this one. Only rank 0 samples. A vision-language
engine's vision program runs on rank 0 only (it is in the first stage, whose embeddings take the image
rows); the rows follow the step's inputs to the first stage's other ranks. A failed collective
names the ranks found dead (each rank's host and pid are in torchrun's store) and stops this rank with an error."""

from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kiln.engine.manifest import MultimodalFacts, WorldFacts
from kiln.engine.programs import Program
from kiln.engine.world import make_groups, pipeline_peers, tensor_group
from kiln.errors import KilnError

_STEP, _STOP = 1, 0
_SHAPE = 5  # a micro-batch's tokens, sequences, block-table width, logits rows, image rows
_IDLE = timedelta(days=30)  # the control group waits for rank 0's next step as long as the server idles
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class StepLayout:
    """What a step's inputs hold beyond the text ones (a vision-language engine's): rows of positions (3 for
    M-RoPE), the width of the image rows (0: a text engine), and whether attend_end follows."""

    position_rows: int = 1
    image_hidden: int = 0
    bidirectional: bool = False

    @classmethod
    def of(cls, facts: MultimodalFacts | None) -> StepLayout:
        if facts is None:
            return cls()
        return cls(facts.position_rows, facts.hidden_size, facts.bidirectional_images)

    def int_count(self, shape: list[int]) -> int:
        """int64 values of a micro-batch's packed inputs (all but the image rows and the KV cache)."""
        tokens, seqs, width, rows, _ = shape
        extra = tokens * (1 + self.bidirectional) if self.image_hidden else 0
        return tokens * (2 + self.position_rows) + seqs * width + 2 * seqs + 1 + rows + extra


@dataclass
class Rank:
    """This process's place in a tensor-parallel engine's world."""

    rank: int
    world: WorldFacts
    control: Any  # a gloo group for the step headers (no timeout while idle)
    dtype: torch.dtype  # of the hidden states pipeline stages pass on
    vocab_size: int  # columns of the logits the last stage sends back to rank 0
    layout: StepLayout = StepLayout()
    first_stage: Any = None  # the group of the first stage's ranks (None: the default group, one stage)

    @property
    def shares_images(self) -> bool:
        """Whether rank 0's image rows go to this rank or (rank 0) from it: the first stage's ranks, when
        it has several (its embeddings take them; later stages take hidden states)."""
        return bool(self.layout.image_hidden) and self.world.tp_size > 1 and self.rank < self.world.tp_size

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def leads(self) -> bool:
        return self.rank == 0


def launch_hint(world: WorldFacts) -> str:
    return f"torchrun --nproc-per-node {world.world_size} -m kiln ..."


def join(
    world: WorldFacts,
    device_type: str,
    timeout_s: float,
    *,
    dtype: torch.dtype,
    vocab_size: int,
    layout: StepLayout = StepLayout(),
) -> Rank:
    """Join the torchrun launch this process is part of; a missing launch or a wrong world size is a clear error."""
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise KilnError(
            f"this engine is tensor-parallel over {world.world_size} ranks: launch it with `{launch_hint(world)}` "
            f"(torchrun sets {', '.join(missing)}, which are missing here)"
        )
    size = int(os.environ["WORLD_SIZE"])
    if size != world.world_size:
        raise KilnError(
            f"this engine was built for {world.world_size} ranks (tp {world.tp_size} x pp {world.pp_size}), "
            f"and {size} were launched: use `{launch_hint(world)}`"
        )
    rank = int(os.environ["RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    groups = make_groups(world.tp_size, world.pp_size)  # the groups the programs' collectives name, made first
    expected = tensor_group(rank, world.tp_size, world.pp_size)
    if groups and groups[rank // world.tp_size].group_name != expected:
        raise KilnError(
            f"rank {rank}: this process made other process groups before the engine's (its programs name group "
            f"{expected!r}): load a tensor x pipeline-parallel engine first in its process"
        )
    control = dist.new_group(backend="gloo", timeout=_IDLE)
    store = _store()
    if store is not None:
        store.set(f"kiln/rank{rank}", f"{socket.gethostname()}:{os.getpid()}")
    return Rank(rank, world, control, dtype, vocab_size, layout, groups[0] if groups else None)


def _store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no store (a process group made without one)
        return None


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        return False


def dead_ranks(world_size: int, own: int) -> str:
    """The ranks on this host whose process is gone (or those the store cannot tell about), in words."""
    store = _store()
    if store is None:
        return "the other ranks could not be checked"
    dead, unknown = [], []
    host = socket.gethostname()
    for rank in range(world_size):
        if rank == own:
            continue
        try:
            where = store.get(f"kiln/rank{rank}").decode()
        except Exception:
            unknown.append(rank)  # the store is gone with its host (rank 0 without torchrun's agent)
            continue
        name, _, pid = where.rpartition(":")
        if name == host and _dead(int(pid)):
            dead.append(rank)
    if dead:
        return "rank " + ", ".join(map(str, dead)) + " died"
    if unknown:
        return "rank " + ", ".join(map(str, unknown)) + " cannot be reached (died?)"
    return "no rank on this host died: one on another host, or a collective timed out"


def _failure(rank: Rank, exc: BaseException) -> KilnError:
    return KilnError(
        f"rank {rank.rank}: a tensor-parallel step failed: {dead_ranks(rank.world_size, rank.rank)} "
        f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})"
    )


def _header_size(world: WorldFacts) -> int:
    return 2 + _SHAPE * world.pp_size  # command, micro-batches, then each one's shape (up to one a stage)


def _header(world: WorldFacts, command: int, batches: list[tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
    batches = batches or []
    header = torch.zeros(_header_size(world), dtype=torch.int64)
    header[0], header[1] = command, len(batches)
    for i, inputs in enumerate(batches):
        tables = inputs[3]
        images = inputs[8].shape[0] if len(inputs) > 8 else 0
        shape = [inputs[0].numel(), tables.shape[0], tables.shape[1], inputs[6].numel(), images]
        header[2 + _SHAPE * i : 2 + _SHAPE * (i + 1)] = torch.tensor(shape)
    return header


def _pack(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The int inputs of a step, flat: the text ones (not the KV cache), then a VLM's mm_index and attend_end."""
    return torch.cat([t.reshape(-1).to(torch.int64) for t in (*inputs[:7], *inputs[9:])])


def _unpack(
    payload: torch.Tensor, shape: list[int], kv_cache: torch.Tensor, layout: StepLayout, images: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    tokens, seqs, width, rows, _ = shape
    extra = [tokens] * (1 + layout.bidirectional) if layout.image_hidden else []
    ids, positions, slots, tables, lens, starts, logits, *more = payload.split(
        [tokens, tokens * layout.position_rows, tokens, seqs * width, seqs, seqs + 1, rows, *extra]
    )
    if layout.position_rows > 1:
        positions = positions.view(layout.position_rows, tokens)
    text = (ids, positions, slots, tables.view(seqs, width).int(), lens.int(), starts.int(), logits, kv_cache)
    return text if images is None else (*text, images, *more)


def _send_images(batches: list[tuple[torch.Tensor, ...]], rank: Rank) -> None:
    """A vision-language step's image rows (rank 0 ran the vision program) to the first stage's ranks."""
    if rank.shares_images:
        rows = torch.cat([inputs[8].to(rank.dtype) for inputs in batches]).contiguous()
        dist.broadcast(rows, 0, group=rank.first_stage)


def _receive_images(shapes: list[list[int]], rank: Rank, device: torch.device) -> list[torch.Tensor | None]:
    """Each micro-batch's image rows (None: a text engine's step, or a later stage's)."""
    if not rank.shares_images:
        return [None] * len(shapes)
    counts = [shape[4] for shape in shapes]
    rows = torch.empty(sum(counts), rank.layout.image_hidden, dtype=rank.dtype, device=device)
    dist.broadcast(rows, 0, group=rank.first_stage)
    return list(rows.split(counts))


class LeaderProgram:
    """Rank 0's program: broadcasts each step's inputs (all but the KV cache), then runs its own shard."""

    def __init__(self, program: Program, rank: Rank) -> None:
        self.program = program
        self.rank = rank
        self.stopped = False
        atexit.register(self.stop)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run_microbatches([inputs])[0]

    def run_microbatches(self, batches: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        """The logits of each micro-batch. With pipeline stages, stage 0 sends each micro-batch's hidden
        states on without waiting, then starts the next one while the later stages work on it."""
        world = self.rank.world
        try:
            dist.broadcast(_header(world, _STEP, batches), 0, group=self.rank.control)
            dist.broadcast(torch.cat([_pack(inputs) for inputs in batches]), 0)
            _send_images(batches, self.rank)
            if world.pp_size == 1:
                return [self.program(*inputs) for inputs in batches]
            requests, logits = [], []
            for inputs in batches:
                out = self.program(*inputs).contiguous()
                requests.append(dist.isend(out, world.tp_size))  # stage 0's hidden states on to stage 1
                logits.append(out.new_empty(inputs[6].numel(), self.rank.vocab_size))
                requests.append(dist.irecv(logits[-1], (world.pp_size - 1) * world.tp_size))  # the last stage's
            for request in requests:
                if request is not None:
                    request.wait()
            return logits
        except RuntimeError as exc:
            self.stopped = True  # the others are gone or stuck: nothing to tell them
            raise _failure(self.rank, exc) from exc

    def stop(self) -> None:
        """Tell the other ranks to exit (best effort: they may be gone)."""
        if self.stopped:
            return
        self.stopped = True
        try:
            dist.broadcast(_header(self.rank.world, _STOP), 0, group=self.rank.control)
        except Exception:
            pass


def follow(program: Program, kv_cache: torch.Tensor, rank: Rank) -> None:
    """A rank other than 0: run each step rank 0 broadcasts, on this rank's KV pool, until it says stop;
    a pipeline stage takes each micro-batch's hidden states from the previous stage and sends its own on."""
    device, world = kv_cache.device, rank.world
    source, target = pipeline_peers(rank.rank, world.tp_size, world.pp_size)
    while True:
        header = torch.empty(_header_size(world), dtype=torch.int64)
        try:
            dist.broadcast(header, 0, group=rank.control)
            command, count, *shapes = header.tolist()
            if command == _STOP:
                return
            shapes = [shapes[_SHAPE * i : _SHAPE * (i + 1)] for i in range(count)]
            sizes = [rank.layout.int_count(shape) for shape in shapes]
            payload = torch.empty(sum(sizes), dtype=torch.int64, device=device)
            dist.broadcast(payload, 0)
            images = _receive_images(shapes, rank, device)
            sent = []
            with torch.inference_mode():
                for part, shape, rows in zip(payload.split(sizes), shapes, images):
                    inputs = _unpack(part, shape, kv_cache, rank.layout, rows)
                    first = inputs[0]
                    if source is not None:  # a later stage: the previous stage's hidden states
                        first = torch.empty(shape[0], world.hidden_size, dtype=rank.dtype, device=device)
                        dist.recv(first, source)
                    out = program(first, *inputs[1:])
                    if target is not None:  # on to the next stage; the last stage's logits to rank 0
                        buffer = out.contiguous()
                        sent.append((dist.isend(buffer, target), buffer))
            for request, _ in sent:
                if request is not None:
                    request.wait()
        except RuntimeError as exc:
            raise _failure(rank, exc) from exc


def agree_on_blocks(num_blocks: int, device: torch.device) -> int:
    """The fewest KV blocks any rank can hold: every rank's pool must hold the same blocks."""
    value = torch.tensor([num_blocks], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
