"""The bench's weight bytes per token: a row's own weights (packed ones as stored) over its batch."""

import torch

from kiln.bench import measure, report
from kiln.engine.weight_bytes import module_weight_bytes


def _row(system: str, batch: int, weight_bytes: int | None) -> dict:
    r = measure.LatencyResult(system, batch, 8, 5, 1.0, 2.0, 1.0, batch * 4)
    row = {**r.to_dict(), "step_bytes": 1e6}
    return row if weight_bytes is None else {**row, "weight_bytes": weight_bytes}


def test_each_row_gets_its_weight_bytes_per_token(capsys):
    rows = report.latency_rows(
        [_row("kiln", 4, 8_000_000), _row("transformers eager", 4, 32_000_000), _row("old", 1, None)], 1e9
    )
    assert [r["weight_bytes_per_token"] for r in rows] == [2_000_000, 8_000_000, None]
    report.print_tables({"device": "cpu", "copy_gb_s": 10.0, "latency": rows})
    out = capsys.readouterr().out
    assert "weight" in out  # the header may wrap
    assert "2.00" in out and "8.00" in out


def test_a_transformers_model_counts_its_embedding_only_when_lm_head_shares_it():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    for tied in (True, False):
        model = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=tied))
        everything = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
        everything.update({b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in model.buffers()})
        table = 100 * 16 * torch.float32.itemsize
        assert module_weight_bytes(model) == sum(everything.values()) - (0 if tied else table)
