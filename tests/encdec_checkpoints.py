"""Tiny random-weight encoder-decoder checkpoints (T5, BART, mBART), two configurations per family.

Weights are redrawn wider than transformers' initialisation, so greedy decoding does not settle on
one token at once and the encoder input changes the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tiny_checkpoints import make_tokenizer

# The tokenizer's ids: 0 pad, 1 bos, 2 eos.
_T5 = dict(
    vocab_size=320, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
)  # fmt: skip
_BART = dict(
    vocab_size=320, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
    bos_token_id=1, pad_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
)  # fmt: skip

# (family, variant) -> (config class, model class, config values)
CONFIGS: dict[tuple[str, str], tuple[str, str, dict[str, Any]]] = {
    # classic T5: ReLU feed-forward, tied embeddings (decoder output scaled by d_model ** -0.5)
    ("t5", "relu-tied"): ("T5Config", "T5ForConditionalGeneration", {**_T5, "feed_forward_proj": "relu"}),
    # T5 v1.1 / Flan-T5: gated-GELU feed-forward, untied head, heads x d_kv wider than d_model
    ("t5", "gated-gelu"): (
        "T5Config",
        "T5ForConditionalGeneration",
        {**_T5, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "d_kv": 16},
    ),
    ("bart", "scaled"): ("BartConfig", "BartForConditionalGeneration", {**_BART, "scale_embedding": True}),
    # unscaled embeddings, gelu, and a forced BOS as the decoder's second token
    ("bart", "forced-bos"): (
        "BartConfig",
        "BartForConditionalGeneration",
        {**_BART, "scale_embedding": False, "forced_bos_token_id": 1},
    ),
    ("mbart", "forced-bos"): (
        "MBartConfig",
        "MBartForConditionalGeneration",
        {**_BART, "scale_embedding": True, "forced_bos_token_id": 1},
    ),
    # unscaled embeddings, a ReLU feed-forward, three decoder layers, no forced BOS
    ("mbart", "relu-3-layers"): (
        "MBartConfig",
        "MBartForConditionalGeneration",
        {**_BART, "scale_embedding": False, "activation_function": "relu", "decoder_layers": 3},
    ),
}


def make_encdec_checkpoint(family: str, variant: str, directory: Path) -> Path:
    import transformers

    config_class, model_class, values = CONFIGS[(family, variant)]
    config = getattr(transformers, config_class)(**values)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.5)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


def make_blip2_t5_checkpoint(directory: Path, feed_forward_proj: str = "gated-gelu") -> Path:
    """BLIP-2 with a tiny Flan-T5-style language model (T5 encoder-decoder), with its processor."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        T5Config,
    )
    from vlm_checkpoints import CLIP, tokenizer_with

    tok = tokenizer_with("<image>")
    text = T5Config(**{**_T5, "vocab_size": len(tok), "feed_forward_proj": feed_forward_proj})
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**{**CLIP, "image_size": 28, "patch_size": 14}),
        qformer_config=Blip2QFormerConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=32
        ),
        text_config=text,
        num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("language_model") and param.dim() > 1:
                param.normal_(0.0, 0.5)
            else:
                param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(directory)
    images = BlipImageProcessor(size={"height": 28, "width": 28})
    Blip2Processor(image_processor=images, tokenizer=tok, num_query_tokens=4).save_pretrained(directory)
    return directory


def make_donut_checkpoint(directory: Path, pre_norm_decoder: bool = True) -> Path:
    """A tiny `VisionEncoderDecoderModel` as Nougat and Donut are built: a Donut-Swin image encoder and an
    mBART (or BART) decoder with cross-attention, with a Donut processor (no text prompt)."""
    from transformers import (
        BartConfig,
        DonutImageProcessor,
        DonutProcessor,
        DonutSwinConfig,
        MBartConfig,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
    )

    encoder = DonutSwinConfig(
        image_size=[32, 24], patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2
    )
    decoder_class = MBartConfig if pre_norm_decoder else BartConfig
    values = {k: v for k, v in _BART.items() if not k.startswith("encoder")}
    decoder = decoder_class(**values, is_decoder=True, add_cross_attention=True, scale_embedding=pre_norm_decoder)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("decoder") and param.dim() > 1:
                param.normal_(0.0, 0.5)
            else:
                param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(directory)
    images = DonutImageProcessor(size={"height": 32, "width": 24}, do_align_long_axis=False, do_thumbnail=False)
    DonutProcessor(image_processor=images, tokenizer=make_tokenizer()).save_pretrained(directory)
    return directory


PIX2STRUCT_MAX_PATCHES = 24


def make_pix2struct_checkpoint(directory: Path, vqa: bool = False) -> Path:
    """A tiny `Pix2StructForConditionalGeneration` (captioning, or VQA as Deplot: the prompt rendered as the image's
    header) with its processor: 4 x 4 patches, at most `PIX2STRUCT_MAX_PATCHES` of them."""
    import transformers
    from transformers import (
        Pix2StructConfig,
        Pix2StructForConditionalGeneration,
        Pix2StructProcessor,
        Pix2StructTextConfig,
        Pix2StructVisionConfig,
    )

    tok = make_tokenizer()
    text = Pix2StructTextConfig(
        vocab_size=len(tok), hidden_size=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=2, dense_act_fn="gelu_new" if vqa else "relu",
    )  # fmt: skip
    vision = Pix2StructVisionConfig(
        hidden_size=32, patch_embed_hidden_size=48, d_ff=64, d_kv=8, num_hidden_layers=2, num_attention_heads=4,
        seq_len=64,
    )  # fmt: skip
    config = Pix2StructConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), is_vqa=vqa)
    torch.manual_seed(0)
    model = Pix2StructForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    # the PIL image processor (named so from transformers 5.2x on; before, the only one)
    image_class = getattr(transformers, "Pix2StructImageProcessorPil", None) or transformers.Pix2StructImageProcessor
    images = image_class(patch_size={"height": 4, "width": 4}, max_patches=PIX2STRUCT_MAX_PATCHES, is_vqa=vqa)
    Pix2StructProcessor(image_processor=images, tokenizer=tok).save_pretrained(directory)
    return directory


def header_font_cache(root: Path) -> Path | None:
    """A Hugging Face cache holding a stand-in for the font Pix2Struct's processor renders VQA headers with
    (`ybelkada/fonts`, Arial.TTF): any TrueType font found here (None where there is none)."""
    import shutil

    candidates = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    try:
        import matplotlib

        candidates.insert(0, Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf")
    except ImportError:
        pass
    font = next((c for c in candidates if c.is_file()), None)
    if font is None:
        return None
    repo = root / "models--ybelkada--fonts"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(font, repo / "snapshots" / commit / "Arial.TTF")
    return root
