"""Tiny randomly initialised text encoders with a word-level tokenizer, saved as transformers model directories:
text-to-image tests without a hub."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "the", "an", "image", "picture", "with", "and", "small", "big", "dark", "light",
         *[str(i) for i in range(10)], "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "digit", "number", "drawing"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def save_tokenizer(out: Path) -> int:
    """A word-level tokenizer over WORDS that wraps a caption in [CLS] ... [SEP]; returns its length."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIAL, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", bos_token="[CLS]", eos_token="[SEP]", model_max_length=512)
    fast.save_pretrained(out)
    return len(fast)


def make_encoder(out: Path, kind: str = "bert", width: int = 32) -> Path:
    """A tiny `kind` encoder (bert, clip or t5) of hidden size `width` with the tokenizer, saved at `out`."""
    import transformers as tf

    torch.manual_seed(0)
    n = len(SPECIAL) + len(WORDS)
    if kind == "bert":
        config = tf.BertConfig(vocab_size=n, hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=2 * width, max_position_embeddings=64)
        net = tf.BertModel(config, add_pooling_layer=False)
    elif kind == "clip":
        net = tf.CLIPTextModel(tf.CLIPTextConfig(vocab_size=n, hidden_size=width, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=2 * width,
                                                 max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                                                 eos_token_id=3))
    else:
        net = tf.T5EncoderModel(tf.T5Config(vocab_size=n, d_model=width, d_kv=width // 2, d_ff=2 * width,
                                            num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=3))
    net.save_pretrained(out)
    assert save_tokenizer(out) == n  # a tokenizer built with mistaken arguments has only its special tokens
    return out


def make_clip(out: Path, width: int = 32, image_size: int = 32) -> Path:
    """A tiny CLIPModel (text and image towers) with the tokenizer, for CLIP score."""
    import transformers as tf

    torch.manual_seed(0)
    n = len(SPECIAL) + len(WORDS)
    text = {"vocab_size": n, "hidden_size": width, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 2 * width, "max_position_embeddings": 32, "pad_token_id": 0, "bos_token_id": 2,
            "eos_token_id": 3}
    vision = {"hidden_size": width, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 2 * width,
              "image_size": image_size, "patch_size": 8}
    tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out)
    save_tokenizer(out)
    return out


NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def caption_shards(digits: Path, out: Path) -> Path:
    """The packed digits with a caption member (txt) naming each digit: shards as others write them."""
    import json

    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((digits / "index.json").read_text())
    for entry in index["splits"].values():
        for shard in entry["shards"]:
            with wds.TarWriter(str(out / shard["file"]), encoder=False) as w:
                for s in wds.WebDataset(str(digits / shard["file"]), shardshuffle=False):
                    label = int(s["cls"])
                    w.write({"__key__": s["__key__"], "png": s["png"], "cls": s["cls"],
                             "txt": f"a drawing of the digit {NAMES[label]}".encode()})
    (out / "index.json").write_text(json.dumps(index))
    return out
