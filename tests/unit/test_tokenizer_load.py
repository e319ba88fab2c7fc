"""An engine's tokenizer/ that names transformers' generic fast tokenizer loads that class directly, into
the same tokenizer AutoTokenizer gives; anything AutoTokenizer could resolve otherwise goes through it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kiln.engine.manifest import TOKENIZER_DIR
from kiln.engine.tokenizers import _generic_class, load_tokenizer

DEMO = Path(__file__).resolve().parents[2] / "demo" / "tiny-kiln"
FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture
def engine(tmp_path) -> Path:
    (tmp_path / TOKENIZER_DIR).mkdir()
    for name in FILES:
        shutil.copy(DEMO / name, tmp_path / TOKENIZER_DIR / name)
    return tmp_path


def _auto(engine: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(engine / TOKENIZER_DIR, local_files_only=True)


def test_the_generic_class_loads_directly_into_the_tokenizer_autotokenizer_gives(engine):
    assert _generic_class(engine / TOKENIZER_DIR) is not None
    got, want = load_tokenizer(engine), _auto(engine)
    assert type(got) is type(want)
    assert {k: str(v) for k, v in vars(got).items() if k != "_tokenizer"} == {
        k: str(v) for k, v in vars(want).items() if k != "_tokenizer"
    }
    for text in ["Hello world", "<|user|>hi<|end|>", "  spaces\n\ttabs ünïcode 日本", ""]:
        assert got(text)["input_ids"] == want(text)["input_ids"]
    messages = [{"role": "user", "content": "hi"}]
    assert got.apply_chat_template(messages, add_generation_prompt=True) == want.apply_chat_template(
        messages, add_generation_prompt=True
    )
    assert got.decode(list(range(60))) == want.decode(list(range(60)))


@pytest.mark.parametrize("change", ["config.json", "auto_map", "another class"])
def test_what_autotokenizer_might_resolve_otherwise_goes_through_it(engine, change):
    directory = engine / TOKENIZER_DIR
    config = json.loads((directory / "tokenizer_config.json").read_text())
    if change == "config.json":
        (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    elif change == "auto_map":
        config["auto_map"] = {"AutoTokenizer": [None, "tokenization_x.XTokenizer"]}
    else:
        config["tokenizer_class"] = "LlamaTokenizer"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert _generic_class(directory) is None
