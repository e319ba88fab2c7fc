#!/usr/bin/env python3
"""Unpack what `scripts/device_train_acc.sh` brought back into a folder for `benchmarks/quant_accuracy.py`.

    python scripts/unpack_acc_model.py FILES_DIR [--dest /work/acc-model-gpu]

FILES_DIR holds acc-model.tgz.0, .1, ... and acc-model.sha256. The pieces are joined and checked against
the sha256, the archive is unpacked into DEST (ckpt/, heldout.txt, calib.txt, training_info.json,
train.log), and the checkpoint's weights, saved in bf16 and sharded, are rewritten as one float32
model.safetensors (bf16 to float32 is exact), with config.json saying float32: the CPU accuracy runs
build float32 engines.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ARCHIVE = "acc-model.tgz"


def joined_archive(src: Path) -> bytes:
    pieces = sorted(src.glob(f"{ARCHIVE}.*[0-9]"), key=lambda p: int(p.suffix[1:]))
    if not pieces:
        raise SystemExit(f"{src}: no {ARCHIVE}.N pieces")
    data = b"".join(p.read_bytes() for p in pieces)
    sums = src / "acc-model.sha256"
    if sums.exists():
        want = sums.read_text().split()[0]
        if hashlib.sha256(data).hexdigest() != want:
            raise SystemExit(f"{src}: the joined pieces do not match {sums.name} (a piece missing or cut?)")
    return data


def extract(data: bytes, dest: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = tar.getnames()
        if not all(n == "acc-model" or n.startswith("acc-model/") for n in names) or any(".." in n for n in names):
            raise SystemExit("unexpected paths in the archive")
        tmp = dest.parent / (dest.name + ".unpacking")
        shutil.rmtree(tmp, ignore_errors=True)
        tar.extractall(tmp, filter="data")
    if dest.exists():
        shutil.rmtree(dest)
    (tmp / "acc-model").rename(dest)
    tmp.rmdir()


def to_float32(ckpt: Path) -> int:
    """Rewrite the (sharded) safetensors weights as one float32 file; returns the parameter count."""
    shards = sorted(ckpt.glob("model*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update({k: v.to(torch.float32) for k, v in load_file(shard).items()})
    for shard in shards:
        shard.unlink()
    (ckpt / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    cfg_path = ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return sum(t.numel() for t in tensors.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path, help="folder holding the acc-model.tgz.N pieces")
    ap.add_argument("--dest", type=Path, default=Path("/work/acc-model-gpu"))
    args = ap.parse_args(argv)
    extract(joined_archive(args.src), args.dest)
    n = to_float32(args.dest / "ckpt")
    info = json.loads((args.dest / "training_info.json").read_text())
    print(
        f"{args.dest}: {n:,d} parameters in float32; "
        f"held-out loss {info['heldout_loss']} (window {info['heldout_window']})"
    )
    d = args.dest
    print(
        f"python benchmarks/quant_accuracy.py {d}/ckpt --heldout {d}/heldout.txt --calib {d}/calib.txt "
        f"--window {info['heldout_window']} --json {d}/results/kiln.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
