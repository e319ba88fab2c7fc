"""`kiln eval`: an engine's perplexity over a text file equals transformers' on the same token windows."""

from __future__ import annotations

import json
import math

import pytest
import torch
from e2e_helpers import DEMO, kiln
from tiny_checkpoints import build_tiny_engine
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln.errors import KilnError
from kiln.eval_perplexity import EvalOptions, evaluate, split_windows

CORPUS = DEMO.parent / "corpus.txt"


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    from kiln.api import build

    out = tmp_path_factory.mktemp("eval") / "demo"
    return build(DEMO, out, progress=False, compile=False, max_seq_len=256, max_input_len=200)


def reference_nll(checkpoint, ids: list[int], window: int) -> tuple[float, int]:
    """Mean NLL of every non-first token of each window, straight from transformers' logits."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), window):
            piece = ids[begin : begin + window]
            if len(piece) < 2:
                continue
            logits = model(torch.tensor([piece])).logits[0].float()
            log_probs = torch.log_softmax(logits[:-1], dim=-1)
            total -= log_probs[torch.arange(len(piece) - 1), torch.tensor(piece[1:])].sum().item()
            count += len(piece) - 1
    return total / count, count


def test_split_windows_scores_every_token_but_each_windows_first():
    windows = split_windows(list(range(10)), 4)
    assert windows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # [8] scores nothing
    with pytest.raises(KilnError, match="at least 2"):
        split_windows([1, 2, 3], 1)


def test_cli_eval_of_the_demo_matches_transformers(demo_engine):
    proc = kiln("eval", str(demo_engine), "--text", str(CORPUS), "--compare-hf", str(DEMO), "--json")
    result = json.loads(proc.stdout)
    ids = AutoTokenizer.from_pretrained(DEMO)(CORPUS.read_text())["input_ids"]
    windows = -(-len(ids) // 200)
    assert result["window"] == 200 and result["windows"] == windows
    assert result["tokens"] == len(ids) - windows
    nll, count = reference_nll(DEMO, ids, 200)
    assert count == result["tokens"]
    assert result["nll"] == pytest.approx(nll, rel=1e-4)
    assert result["hf_nll"] == pytest.approx(nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert result["ratio"] == pytest.approx(1.0, abs=1e-4)
    assert result["quantization"] is None and result["engine"] == str(demo_engine)


def test_cli_eval_text_summary_and_max_tokens(demo_engine):
    proc = kiln("eval", str(demo_engine), "--text", str(CORPUS), "--max-tokens", "301", "--window", "100")
    # 301 tokens: windows of 100, 100, 100 and 1 (which scores nothing and is dropped)
    assert "over 297 tokens, 3 window(s) of at most 100" in proc.stdout
    assert "perplexity" in proc.stdout and "transformers" not in proc.stdout


def test_eval_of_a_random_checkpoint_matches_transformers(checkpoints, tmp_path):
    checkpoint = checkpoints("llama")
    engine = build_tiny_engine(checkpoint, tmp_path / "engine")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    result = evaluate(EvalOptions(str(engine), str(text), compare_hf=str(checkpoint), progress=False))
    ids = AutoTokenizer.from_pretrained(checkpoint)(text.read_text())["input_ids"]
    assert result.window == 32  # the engine's max_input_len
    nll, count = reference_nll(checkpoint, ids, 32)
    assert result.tokens == count
    assert result.nll == pytest.approx(nll, rel=1e-4)
    assert result.perplexity > 100  # random weights: close to the vocabulary's 320
    assert result.ratio == pytest.approx(1.0, abs=1e-4)


def test_eval_errors(demo_engine, tmp_path):
    missing = kiln("eval", str(demo_engine), "--text", str(tmp_path / "nope.txt"), check=False)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    assert "is empty" in kiln("eval", str(demo_engine), "--text", str(empty), check=False).stderr
    with pytest.raises(KilnError, match="longer than this engine's prompts"):
        evaluate(EvalOptions(str(demo_engine), str(CORPUS), window=201, progress=False))
    with pytest.raises(KilnError, match="not a checkpoint directory"):
        evaluate(EvalOptions(str(demo_engine), str(CORPUS), compare_hf=str(tmp_path), max_tokens=50, progress=False))
