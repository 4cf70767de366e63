"""Text-to-image: frozen text encoders (built here, tiny and random, with a word-level tokenizer), captions from a
text member or class templates, text embeddings written by 2 ranks and read in the data's order, every strategy
with the encoder outside the wrapping, prompts, CLIP score and prompt accuracy, kill -9 and resume."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import CONFIGS, ROOT, events, records, run_cli, smoke_args, train_command
from PIL import Image
from safetensors.torch import load_file
from test_crash import STEPS, _command, _keys, _kill_during_training, _state
from textenc import make_clip, make_encoder

from gen_dist.config import load_config
from gen_dist.data import DataError, Fields, ShardStream, load_index, open_catalog
from gen_dist.data.text import TextLayout, pad_text
from gen_dist.schema import ConfigError
from gen_dist.tasks.text import Conditioner, TextEncoders, per_caption

pytestmark = pytest.mark.timeout(600)
LONG = "a big dark picture of the digit one with a small light two and three and four and five"


def _cfg(encoders: list[Path], *extra: str):
    names = ",".join(str(p) for p in encoders)
    return load_config(CONFIGS / "smoke_diffusion_text.yaml", [f"diffusion.text_encoder=[{names}]", *extra])


def test_encoders_pad_mask_pool_and_cached_rows_equal_live_ones(tmp_path: Path, digits: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    paths = [make_encoder(tmp_path / k, k, w) for k, w in (("bert", 32), ("clip", 24), ("t5", 16))]
    lengths = [6, 8, 5]
    enc = TextEncoders([str(p) for p in paths], lengths)
    prompts = ["a photo of seven", LONG]
    hidden, masks, pooled = enc(prompts)
    assert [tuple(h.shape) for h in hidden] == [(2, 6, 32), (2, 8, 24), (2, 5, 16)]
    assert pooled.shape == (2, 32 + 24 + 16)
    assert [int(m[0].sum()) for m in masks] == [6, 6, 5]  # [CLS] a photo of seven [SEP], cut to 5 for the T5
    assert all(torch.all(h[m == 0] == 0) for h, m in zip(hidden, masks, strict=True))
    enc([LONG])
    assert capsys.readouterr().err.count("is cut to diffusion.text_max_length") == 1  # said once
    cfg = _cfg(paths, f"diffusion.text_max_length={lengths}", f"data.path={digits}")
    live = Conditioner(cfg, on_the_fly=True).encode(prompts, torch.device("cpu"))
    stored = pad_text(per_caption(hidden, masks, pooled), lengths, 32)
    assert live["text"].shape == (2, sum(lengths), 32)
    for k in live:
        torch.testing.assert_close(live[k].float(), stored[k].float())


@pytest.mark.parametrize(("override", "message"), [
    ("data.caption_templates=[]", "needs captions"),
    ("data.caption_templates=[a photo]", "every template names the class"),
    ("diffusion.text_encoder=[/nonexistent/encoder]", "/nonexistent/encoder does not exist"),
    ("diffusion.text_max_length=[8,8,8]", "one per encoder"),
    ("data.class_names=[a,b]", "2 names for diffusion.num_classes=10"),
])
def test_bad_text_settings_are_named(override: str, message: str, text_encoder: Path, digits: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg([text_encoder], f"data.path={digits}", override)


def test_mmdit_without_text_and_a_missing_encoder_fail_before_launch(tmp_path: Path, digits: Path) -> None:
    with pytest.raises(ConfigError, match="mmdit is a text-to-image transformer"):
        load_config(CONFIGS / "smoke_diffusion.yaml", ["diffusion.backbone=mmdit", f"data.path={digits}"])
    proc = run_cli("launch", *smoke_args("diffusion_text", tmp_path / "r", digits),
                   "diffusion.text_encoder=[missing/dir/x]",
                   "--nproc", "2", "--dry-run", check=False)
    assert proc.returncode != 0 and "missing/dir/x does not exist" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_a_sample_without_its_caption_is_reported(digits: Path) -> None:
    catalog = open_catalog(str(digits), "train")
    stream = ShardStream(catalog, "train", 16, 0, 1, 1, 0, 16, 8, 1, False, strict=True,
                         fields=Fields(1, 8, caption="txt"))
    with pytest.raises(DataError, match=r"no caption \(txt\)"):
        next(iter(stream))


def _members(shard: Path) -> list[dict]:
    return list(wds.WebDataset(str(shard), shardshuffle=False))


def test_text_embeddings_by_two_ranks_are_read_with_the_data_in_its_order(tmp_path: Path, captioned: Path,
                                                                          text_encoder: Path) -> None:
    out = tmp_path / "emb"
    run_cli("data", "text-embeddings", str(captioned), "--encoder", str(text_encoder), "--max-length", "12",
            "--out", str(out), "--nproc", "2")
    source = load_index(captioned)["splits"]["train"]
    assert load_index(out)["splits"]["train"] == source
    enc = TextEncoders([str(text_encoder)], [12])
    for shard in source["shards"]:
        a, b = _members(captioned / shard["file"]), _members(out / shard["file"])
        assert [s["__key__"] for s in a] == [s["__key__"] for s in b]
    first = _members(out / source["shards"][0]["file"])[:4]
    captions = [s["txt"].decode() for s in _members(captioned / source["shards"][0]["file"])[:4]]
    hidden, masks, _ = enc(captions)
    for s, h, m in zip(first, hidden[0], masks[0], strict=True):
        stored = np.load(__import__("io").BytesIO(s["text0.npy"]))
        assert stored.dtype == np.float16 and stored.shape == (int(m.sum()), 32)
        np.testing.assert_allclose(stored, h[: int(m.sum())].numpy(), atol=2e-3, rtol=2e-3)
    # The stream over the data with its embeddings: each sample's condition is its own caption's encoding.
    stream = ShardStream(open_catalog(str(captioned), "train"), "train", 32, 1, 2, 1, 0, 64, 8, 1, False,
                         strict=True, fields=Fields(1, 8, caption="txt"), text=TextLayout(str(out), (12,), 32))
    batch = next(iter(stream))
    live = pad_text(per_caption(*enc(batch["caption"])), [12], 32)
    torch.testing.assert_close(batch["text"], live["text"], atol=2e-3, rtol=2e-3)
    assert torch.equal(batch["text_mask"], live["text_mask"])
    # Embeddings of another encoder (another width) are refused before anything trains on them.
    other = make_encoder(tmp_path / "other", "clip", 24)
    with pytest.raises(ConfigError, match=r"was encoded by .* width 32.* width 24"):
        _cfg([other], f"data.path={captioned}", f"data.text_embeddings={out}", "data.caption_templates=[]",
             "data.caption_key=txt", "diffusion.text_max_length=[12]")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory, digits: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("classifier")
    run_cli("train", str(CONFIGS / "smoke_classifier.yaml"), f"run_dir={run_dir}", f"data.path={digits}")
    return run_dir


STRATEGIES = {"ddp": [], "zero3": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"],
              "fsdp": ["parallel.strategy=fsdp", "train.activation_checkpointing=true"]}
SMALL_DIT = ["diffusion.dit_depth=2", "diffusion.dit_heads=2", "diffusion.dit_head_dim=16"]


# Class prompts from templates (prompt accuracy), or the shards' own captions (evaluated on the test split's).
@pytest.mark.parametrize(("strategy", "backbone", "objective", "captions"),
                         [("ddp", "unet", "ddpm", False), ("zero3", "dit", "flow", True),
                          ("fsdp", "mmdit", "edm", False)])
def test_text_model_trains_scores_and_samples_prompts(strategy: str, backbone: str, objective: str, captions: bool,
                                                      tmp_path: Path, digits: Path, captioned: Path,
                                                      text_encoder: Path, classifier: Path) -> None:
    clip = make_clip(tmp_path / "clip")
    run = tmp_path / "run"
    data = ["data.caption_key=txt", "data.caption_templates=[]"] if captions else []
    run_cli(*train_command(2, *smoke_args("diffusion_text", run, captioned if captions else digits), *data,
                           f"diffusion.text_encoder=[{text_encoder}]", f"diffusion.backbone={backbone}",
                           f"diffusion.objective={objective}", *SMALL_DIT, *STRATEGIES[strategy],
                           "train.sample_prompts=[a photo of seven,a photo of one]", "eval.every=6", "eval.n=20",
                           "eval.batch_size=10", f"eval.extractors=[{classifier}]",
                           "eval.metrics=[fid,accuracy,clip_score]", f"eval.clip_model={clip}"))
    scores = [r for r in records(run) if "eval/clip_score20" in r]
    assert scores and 0 <= scores[-1]["eval/clip_score20"] <= 100 and np.isfinite(scores[-1]["eval/domain/fid20"])
    if captions:  # samples of the test split's captions: no class prompt to score
        assert "eval/domain/accuracy20" not in scores[-1]
        assert any("accuracy" in s for e in events(run, "eval") for s in e["skipped"])
    else:
        assert 0 <= scores[-1]["eval/domain/accuracy20"] <= 1
    # The grid has one column per prompt; the encoder is in no checkpoint file.
    assert Image.open(run / "samples" / "step_00000006.png").size[0] < Image.open(run / "samples" /
                                                                                  "step_00000006.png").size[1]
    for f in (run / "checkpoints" / "step_00000006").rglob("*.safetensors"):
        assert not [k for k in load_file(str(f)) if "word_embeddings" in k or "text_encoder" in k], f
    out = tmp_path / "prompts.npz"
    run_cli("sample", str(run), "--prompt", "a photo of seven", "--prompt", LONG, "--n", "4", "--out", str(out))
    assert np.load(out)["images"].shape == (4, 8, 8, 1)


def test_clip_score_is_clipped_cosine_of_clip_embeddings(tmp_path: Path) -> None:
    from transformers import CLIPModel

    from gen_dist.clip_score import ClipScore

    clip = make_clip(tmp_path / "clip")
    scorer = ClipScore(str(clip), torch.device("cpu"))
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    prompts = ["a photo of seven", "one", "a small two", "three", "the digit four", "five"]
    net = CLIPModel.from_pretrained(clip).eval()
    with torch.no_grad():
        pixels = torch.nn.functional.interpolate(images.float().expand(-1, 3, -1, -1) / 255, size=(32, 32),
                                                 mode="bicubic", antialias=True).clamp(0, 1)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.48145466, 0.4578275, 0.40821073),
                                                                (0.26862954, 0.26130258, 0.27577711)))
        out = net(pixel_values=(pixels - mean) / std, **scorer.tokenizer(prompts, padding=True, return_tensors="pt"))
        cos = out.logits_per_image.diagonal() / net.logit_scale.exp()
    assert scorer.sum(images, prompts) == pytest.approx(float((100 * cos.clamp(min=0)).sum()), rel=1e-4, abs=1e-3)
    assert scorer.sum(images[:3], prompts[:3]) + scorer.sum(images[3:], prompts[3:]) == pytest.approx(
        scorer.sum(images, prompts), rel=1e-4, abs=1e-3)
    with pytest.raises(ConfigError, match="eval.clip_model"):
        ClipScore(str(tmp_path / "none"), torch.device("cpu"))


def test_prompting_a_model_without_text_is_refused(tmp_path: Path, digits: Path) -> None:
    run_cli("train", *smoke_args("diffusion", tmp_path / "r", digits), "train.steps=1")
    proc = run_cli("sample", str(tmp_path / "r"), "--prompt", "a seven", "--out", str(tmp_path / "x.png"),
                   check=False)
    assert proc.returncode != 0 and "without text conditioning" in proc.stderr


@pytest.mark.parametrize("cached", [False, True], ids=["on-the-fly", "cached"])
def test_kill9_then_resume_equals_uninterrupted(cached: bool, tmp_path: Path, digits: Path, captioned: Path,
                                                text_encoder: Path) -> None:
    encoder = shutil.copytree(text_encoder, tmp_path / "encoder")
    extra = [f"diffusion.text_encoder=[{encoder}]", "diffusion.text_max_length=[12]"]
    data = digits
    if cached:
        grid = "a drawing of the digit one"
        run_cli("data", "text-embeddings", str(captioned), "--encoder", str(encoder), "--max-length", "12",
                "--out", str(tmp_path / "emb"), "--prompt", grid)
        extra += [f"data.text_embeddings={tmp_path / 'emb'}", "data.caption_key=txt", "data.caption_templates=[]",
                  f"train.sample_prompts=[{grid}]"]
        data = captioned
        # Training never loads the encoder: without its weights, it must not notice.
        (encoder / "model.safetensors").rename(tmp_path / "weights")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    subprocess.run(_command("diffusion_text", straight, data, 2, tuple(extra)), cwd=ROOT, check=True,
                   capture_output=True, env=env)
    rng = random.Random(f"text{cached}")
    assert sum(_kill_during_training(_command("diffusion_text", killed, data, 2, tuple(extra)), killed, rng)
               for _ in range(2)) == 2
    run_cli(*_command("diffusion_text", killed, data, 2, tuple(extra))[3:])
    a, b = _state(straight), _state(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = _keys(straight)
    assert len(keys) == STEPS * 2 and keys == _keys(killed)
    if cached:  # a trained text model samples from prompts without the embeddings it was trained on
        shutil.rmtree(tmp_path / "emb")
        (tmp_path / "weights").rename(encoder / "model.safetensors")
        run_cli("sample", str(killed), "--prompt", "a drawing of the digit one", "--n", "2",
                "--out", str(tmp_path / "one.png"))
    # The run records the encoders it was conditioned by: source and weights checksum.
    meta = json.loads((straight / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())
    assert [e["source"] for e in meta["state"]["task"]["text_encoders"]] == [str(encoder)]
