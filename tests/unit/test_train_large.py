"""scripts/train_large.py and train_corpus.py's source corpus: the held-out score is kiln eval's windows,
the sampler cuts true windows of the stream, and the corpus keeps test folders out."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from train_corpus import _python_files, pick_documents  # noqa: E402
from train_large import WindowSampler, window_loss  # noqa: E402

from kiln.eval_perplexity import split_windows  # noqa: E402


def test_window_loss_scores_kiln_eval_windows() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (77,)).tolist()  # 4 windows of 20 tokens and a last one of 17
    total, count = 0.0, 0
    with torch.no_grad():
        for window in split_windows(ids, 20):
            x = torch.tensor([window])
            logp = torch.log_softmax(model(x).logits[0, :-1], dim=-1)
            total -= float(logp.gather(1, x[0, 1:, None]).sum())
            count += len(window) - 1
    loss, scored = window_loss(model, ids, 20, torch.device("cpu"), batch=3)
    assert scored == count == 77 - 4
    assert abs(loss - total / count) < 1e-5


def test_sampler_cuts_stream_windows() -> None:
    stream = torch.arange(100, dtype=torch.int32)
    batch = WindowSampler(stream, 8, seed=1, device=torch.device("cpu"))(16)
    assert batch.shape == (16, 8) and batch.dtype == torch.long
    assert torch.equal((batch - batch[:, :1]) % 100, torch.arange(8).expand(16, 8))  # consecutive, wrapping
    again = WindowSampler(stream, 8, seed=1, device=torch.device("cpu"))(16)
    assert torch.equal(batch, again)


def test_source_files_skip_tests_and_caches(tmp_path: Path) -> None:
    for name in ("a.py", "pkg/b.py", "pkg/tests/t.py", "test/c.py", "pkg/__pycache__/d.py", "pkg/e.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    assert [p.relative_to(tmp_path).as_posix() for p in _python_files(tmp_path)] == ["a.py", "pkg/b.py"]


def test_pick_documents_is_seeded_and_whole() -> None:
    docs = [f"doc {i} " * 10 for i in range(50)]
    picked = pick_documents(docs, 500, seed=3)
    assert picked == pick_documents(docs, 500, seed=3) != pick_documents(docs, 500, seed=4)
    assert set(picked) <= set(docs) and 500 <= sum(len(d) + 2 for d in picked) < 500 + 72
