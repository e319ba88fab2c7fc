"""Tiny random-weight checkpoints of the vision-language families added after the first five (Fuyu...).

Like `vlm_checkpoints`: the real transformers config, model and processor classes at toy sizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
FUYU_MARKS = ("|SPEAKER|", "|NEWLINE|", "<0x00>", "<0x01>", "<0x02>", "<0x03>", "<0x04>")


def fuyu_tokenizer() -> Any:
    """A BPE tokenizer shaped like Fuyu's: spaces as '▁' with one prepended, and the image, newline, box and
    begin-of-answer marks as whole tokens, so a run of image tokens tokenizes with the leading '▁' that
    `FuyuProcessor` strips."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\|[A-Z]+\||<0x0[0-4]>"), behavior="isolated"),
            pre_tokenizers.Split("▁", behavior="merged_with_next"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    text = [
        "The kiln fires clay into stone. Paged attention stores keys in blocks.",
        "héllo wörld ✓",
        " ".join(FUYU_MARKS),
    ]
    trainer = trainers.BpeTrainer(vocab_size=336, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=["▁"])
    tok.train_from_iterator(text * 20, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def fuyu(v: Mapping[str, Any]) -> tuple[Any, Any]:
    """Persimmon language model (partial rotary, q/k layer norm, relu2); images resized into 32x48 (base)."""
    from transformers import FuyuConfig, FuyuImageProcessor, FuyuProcessor, PersimmonConfig
    from transformers import FuyuForCausalLM as Model

    tok = fuyu_tokenizer()
    text = PersimmonConfig(
        vocab_size=336,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        hidden_act="relu2",
        **v.get("text", {}),
    )
    patch = v.get("patch_size", 8)
    config = FuyuConfig(
        text_config=text,
        hidden_size=text.hidden_size,  # transformers < 5.2x sizes the patch projection from the top-level field
        patch_size=patch,
        image_size=32,
        image_token_id=tok.convert_tokens_to_ids("|SPEAKER|"),
    )
    height, width = v.get("image_size", (32, 48))
    images = FuyuImageProcessor(size={"height": height, "width": width}, patch_size={"height": patch, "width": patch})
    return Model(config), FuyuProcessor(image_processor=images, tokenizer=tok)


def kosmos2_tokenizer() -> Any:
    """A byte-level BPE tokenizer with Kosmos-2's special-token ids (<s> 0, <pad> 1, </s> 2, <unk> 3): the processor
    takes the ids after <unk> as the image placeholders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The kiln fires clay into stone. Paged attention stores keys in blocks.", "héllo wörld ✓"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text * 20, trainer)
    # <s> ... </s>, as the checkpoint's XLM-R tokenizer (Kosmos2Processor writes a text prompt <s> ... instead)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def kosmos2(v: Mapping[str, Any]) -> tuple[Any, Any]:
    """64 latent queries (the processor's image token count); the processor adds 1035 grounding tokens."""
    from transformers import CLIPImageProcessor, Kosmos2Config, Kosmos2Processor
    from transformers import Kosmos2ForConditionalGeneration as Model

    processor = Kosmos2Processor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=kosmos2_tokenizer(),
    )
    text = {
        "vocab_size": 1408,
        "embed_dim": 64,
        "layers": 2,
        "ffn_dim": 128,
        "attention_heads": 4,
        "max_position_embeddings": 512,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        **v.get("text", {}),
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 28,
        "patch_size": 14,
        **v.get("vision", {}),
    }
    return Model(Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=64)), processor


MORE_FAMILIES = {"fuyu": fuyu, "kosmos2": kosmos2}

MORE_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "fuyu": {
        "base": {},
        # 4x4 patches of a 40x40 target (up to 100 image tokens), no q/k norm, a quarter of each head rotated
        "patch-4-no-qk-norm": {
            "patch_size": 4,
            "image_size": (40, 40),
            "text": {
                "qk_layernorm": False,
                "rope_parameters": {"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.25},
            },
        },
    },
    "kosmos2": {
        "base": {},
        # unscaled, untied embeddings, three text layers; patches of 7 (16 per image) through a 1-layer tower
        "3-layers-unscaled-untied": {
            "text": {"layers": 3, "scale_embedding": False, "tie_word_embeddings": False},
            "vision": {"patch_size": 7, "num_hidden_layers": 1},
        },
    },
}
