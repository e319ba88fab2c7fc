"""`torchrun --nproc-per-node N -m kiln build ... --tp-size / --pp-size`: each process builds its own rank's
program (under the same fake process group as a one-process build, so the programs are the same) into one
staging directory named after the launch; rank 0 waits for every rank's program, reads what each recorded
of it (the manifest's op modules, passes and quantized layers), then writes the manifest and moves the
engine into place. No collective runs: the ranks meet through files in the staging directory."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.compiler.pipeline import WrittenProgram
from kiln.config import BuildConfig
from kiln.engine.manifest import WorldFacts
from kiln.errors import KilnError

BUILT = ".built"  # a rank's marker in its directory (what it wrote, as JSON), removed by rank 0
WAIT_S = 6 * 3600.0  # how long rank 0 waits for the others (torchrun stops every rank when one fails)


@dataclass(frozen=True)
class BuildLaunch:
    rank: int
    world_size: int
    run_id: str

    @property
    def leads(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, config: BuildConfig) -> BuildLaunch | None:
        """This process's part of a torchrun launch of several processes (None: a one-process build)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if "RANK" not in os.environ or size == 1:
            return None
        wanted = config.tp_size * config.pp_size
        if size != wanted:
            raise KilnError(
                f"this build is for {wanted} ranks (--tp-size {config.tp_size} x --pp-size {config.pp_size}) and "
                f"torchrun launched {size} processes: use --nproc-per-node {wanted}, or build in one process"
            )
        run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}-{os.environ.get('MASTER_PORT', '0')}"
        return cls(int(os.environ["RANK"]), size, re.sub(r"[^A-Za-z0-9_.-]", "_", run))

    def finish_rank(self, engine_dir: Path, written: WrittenProgram) -> list[WrittenProgram]:
        """Ranks but 0: record this rank's program as written ([]). Rank 0: wait until every rank's is, then
        unmark them; what each rank wrote, in rank order."""
        if not self.leads:
            marker = engine_dir / WorldFacts.rank_dir(self.rank) / BUILT
            partial = marker.with_suffix(".tmp")
            partial.write_text(json.dumps(dataclasses.asdict(written)))
            partial.rename(marker)  # complete when it appears
            return []
        markers = [engine_dir / WorldFacts.rank_dir(r) / BUILT for r in range(1, self.world_size)]
        deadline = time.monotonic() + WAIT_S
        while not all(m.exists() for m in markers):
            if time.monotonic() > deadline:
                missing = [str(r + 1) for r, m in enumerate(markers) if not m.exists()]
                raise KilnError(f"rank 0 gave up waiting for the programs of rank {', '.join(missing)}")
            time.sleep(0.2)
        others = [_written(json.loads(m.read_text())) for m in markers]
        for marker in markers:
            marker.unlink()
        return [written, *others]


def _written(fields: dict) -> WrittenProgram:
    return WrittenProgram(
        compiled=fields["compiled"],
        op_modules={op: tuple(modules) for op, modules in fields["op_modules"].items()},
        passes=dict(fields["passes"]),
        quantized_layers=tuple(fields["quantized_layers"]),
    )
