"""AWQ search (kiln.compiler.quantize.awq): its int4 rounding, the scale fold (the same function in full
precision), and that it beats plain round-to-nearest int4 on the trained demo checkpoint."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import FAMILIES
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln.compiler.quantize import awq
from kiln.errors import UnsupportedModelError

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo" / "tiny-kiln"
HELD_OUT = Path(__file__).parent / "data" / "demo_heldout.txt"  # written for this test: not in the corpus
GROUP = 32  # the demo's K is 128 (512 for down_proj)


def documents(path: Path, tokenizer) -> list[torch.Tensor]:
    """Blank-line separated documents, each <bos> text <eos> as the demo was trained."""
    blocks = [b.strip() for b in path.read_text().split("\n\n") if b.strip()]
    return [torch.tensor(tokenizer(b)["input_ids"] + [tokenizer.eos_token_id]) for b in blocks]


@pytest.fixture(scope="module")
def demo():
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    return model, documents(REPO / "demo" / "corpus.txt", tokenizer), documents(HELD_OUT, tokenizer)


def scores(model, reference, seqs) -> tuple[float, float]:
    """(perplexity of `model` over `seqs`, mean KL(reference || model) per scored token)."""
    nll, kl, count = 0.0, 0.0, 0
    with torch.no_grad():
        for ids in seqs:
            ours = torch.log_softmax(model(ids[None]).logits[0, :-1].float(), -1)
            theirs = torch.log_softmax(reference(ids[None]).logits[0, :-1].float(), -1)
            nll -= ours.gather(1, ids[1:, None]).sum().item()
            kl += (theirs.exp() * (theirs - ours)).sum().item()
            count += len(ids) - 1
    return math.exp(nll / count), kl / count


def rtn(model, group_size: int):
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(awq._rtn_int4(module.weight, group_size).dequantize())
    return quantized


def test_rtn_int4_rounds_each_group_to_16_levels_with_a_zero_point():
    torch.manual_seed(0)
    w = torch.randn(8, 64) * 0.05
    w[0, :16] = torch.rand(16) + 0.5  # a group of positive values only: its range still holds 0
    q = awq._rtn_int4(w, 16)
    assert q.bits == 4 and q.group_size == 16 and q.values.dtype == torch.int8
    assert q.values.min() >= 0 and q.values.max() <= 15
    assert torch.equal(q.zeros, q.zeros.round()) and q.zeros.min() >= 0 and q.zeros.max() <= 15
    dense = q.dequantize()
    expected = (q.values.float() - q.zeros.repeat_interleave(16, 1)) * q.scales.repeat_interleave(16, 1)
    assert torch.equal(dense, expected)
    assert ((dense - w).abs() <= q.scales.repeat_interleave(16, 1) / 2 + 1e-7).all()
    assert q.zeros[0, 0] == 0  # min clamped to 0


def fold_random_scales(model, seed: int) -> int:
    """Fold log-uniform scales in [0.1, 10] into every group that fits; the number of groups folded."""
    generator = torch.Generator().manual_seed(seed)
    folded = 0
    for layer in awq.decoder_layers(model):
        for group in awq.layout_of(model):
            prev = layer.get_submodule(group.prev)
            linears = [layer.get_submodule(p) for p in group.linears]
            if awq.group_fits(prev, linears):
                s = torch.exp((torch.rand(linears[0].in_features, generator=generator) * 2 - 1) * math.log(10))
                awq.fold_scale(prev, linears, s)
                folded += 1
    return folded


def random_model(family: str, **options):
    config, model_cls = FAMILIES[family](**options)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # norms of ones would hide a fold into the wrong place
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model


@pytest.mark.parametrize(
    "family, options, groups",
    [
        ("llama", {}, 3),  # GQA: v_proj's outputs are not o_proj's inputs
        ("qwen2", {"num_key_value_heads": 4}, 4),  # q/k/v biases, and v -> o folded
        ("mistral", {}, 3),
        ("qwen3", {}, 3),  # q/k norms after the projections
    ],
)
def test_folding_scales_keeps_the_function(family, options, groups):
    model = random_model(family, **options)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        assert fold_random_scales(model, seed=2) == groups * model.config.num_hidden_layers
        after = model(ids).logits
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_folding_scales_keeps_the_demo_function(demo):
    model, corpus, _ = demo
    folded = copy.deepcopy(model)
    fold_random_scales(folded, seed=3)
    with torch.no_grad():
        for ids in corpus[:3]:
            before, after = model(ids[None]).logits, folded(ids[None]).logits
            assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_awq_beats_round_to_nearest_on_the_demo(demo):
    model, corpus, held_out = demo
    quantized = copy.deepcopy(model)
    result = awq.awq_quantize(quantized, corpus, GROUP)
    assert result.method == "int4_awq" and result.bits == 4 and result.group_size == GROUP
    names = {f"model.layers.{i}.{p}.weight" for i in range(4) for g in awq.LLAMA_LIKE for p in g.linears}
    assert set(result.weights) == names
    params = dict(quantized.named_parameters())
    for name, weight in result.weights.items():  # the model holds exactly what the weights dequantize to
        assert torch.equal(params[name], weight.dequantize(torch.float32))
    base_ppl, _ = scores(model, model, held_out)
    rtn_ppl, rtn_kl = scores(rtn(model, GROUP), model, held_out)
    awq_ppl, awq_kl = scores(quantized, model, held_out)
    print(
        f"demo held-out: dense {base_ppl:.3f}, rtn {rtn_ppl:.3f} (KL {rtn_kl:.5f}), awq {awq_ppl:.3f} (KL {awq_kl:.5f})"
    )
    assert awq_ppl < rtn_ppl
    assert awq_kl < rtn_kl  # and closer to the dense model's predictions


def test_awq_recovers_what_round_to_nearest_loses_on_activation_outliers(demo):
    """The demo with a few input channels per norm made 30x larger (their weight columns 30x smaller: the
    same function): round-to-nearest flattens those columns; AWQ's scales bring them back."""
    model, corpus, held_out = demo
    spiky = copy.deepcopy(model)
    for layer in spiky.model.layers:
        for norm, linears in (
            (layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
            (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]),
        ):
            s = torch.ones(128)
            s[::16] = 1 / 30
            awq.fold_scale(norm, linears, s)
    quantized = copy.deepcopy(spiky)
    awq.awq_quantize(quantized, corpus, GROUP)
    rtn_ppl, rtn_kl = scores(rtn(spiky, GROUP), model, held_out)
    awq_ppl, awq_kl = scores(quantized, model, held_out)
    print(f"outliers held-out: rtn {rtn_ppl:.3f} (KL {rtn_kl:.5f}), awq {awq_ppl:.3f} (KL {awq_kl:.5f})")
    assert awq_kl < rtn_kl / 5
    assert awq_ppl < rtn_ppl


def test_awq_runs_on_kilns_own_loaded_model():
    """The build loads the model with kiln's attention (`load_checkpoint`): AWQ runs on it as it is."""
    from kiln.models.loader import load_checkpoint

    loaded = load_checkpoint(DEMO, torch.float32, torch.device("cpu"))
    ids = [torch.tensor(loaded.tokenizer("A kiln is a hot oven for clay.")["input_ids"])]
    result = awq.awq_quantize(loaded.model, ids, 64, clip=False)
    assert len(result.weights) == 28 and result.group_size == 64


def test_awq_refuses_other_architectures_and_no_text():
    with pytest.raises(UnsupportedModelError, match="AWQ search supports"):
        awq.awq_quantize(random_model("gemma2"), [torch.tensor([1, 2, 3])], 16)
    with pytest.raises(Exception, match="calibration text"):
        awq.awq_quantize(random_model("llama"), [], 16)


def test_awq_in_bfloat16_keeps_its_scales_in_the_model_dtype():
    model = random_model("qwen2").to(torch.bfloat16)
    ids = [torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(4))]
    result = awq.awq_quantize(model, ids, 16)
    params = dict(model.named_parameters())
    assert len(result.weights) == 7 * model.config.num_hidden_layers
    for name, weight in result.weights.items():
        assert weight.scales.dtype == torch.bfloat16 and weight.zeros is not None
        assert torch.equal(params[name], weight.dequantize(torch.bfloat16))


def test_calibration_ids_cut_the_text_into_sequences(demo):
    from kiln.compiler.quantize.calibration import calibration_ids
    from kiln.errors import KilnError

    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    text = (REPO / "demo" / "corpus.txt").read_text()
    ids = tokenizer(text)["input_ids"]
    sequences = calibration_ids(tokenizer, text, seq_len=100, max_sequences=5)
    assert [len(s) for s in sequences] == [100] * 5
    assert torch.equal(torch.cat(sequences), torch.tensor(ids[:500]))
    everything = calibration_ids(tokenizer, text, seq_len=400)
    assert torch.equal(torch.cat(everything), torch.tensor(ids[: sum(len(s) for s in everything)]))
    assert len(everything) == -(-len(ids) // 400) - (len(ids) % 400 == 1)
    with pytest.raises(KilnError, match="empty"):
        calibration_ids(tokenizer, " \n")
