"""Fine-tuning pretrained diffusers pipelines (tiny ones of every supported class, built here with random weights):
the conditioning is the pipelines' own, LoRA under DDP, ZeRO-3 and FSDP2 agrees, its checkpoints hold the adapter
alone and resume bit for bit after kill -9, full fine-tunes of a UNet and a transformer, every export format read
back by the library that loads it, and bad inputs named before launch."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, ROOT, events, run_cli, train_command
from safetensors.torch import load_file
from test_crash import STEPS, _command, _keys, _kill_during_training, _state
from tinypipes import tiny_flux, tiny_pixart, tiny_sd, tiny_sd3, tiny_sdxl

from gen_dist.config import load_config
from gen_dist.formats import FORMATS, load_tuned
from gen_dist.pipelines import open_pipeline
from gen_dist.schema import ConfigError
from gen_dist.tasks.text import text_shape

pytestmark = pytest.mark.timeout(900)
BUILD = {"sd": tiny_sd, "sd_v": lambda out: tiny_sd(out, "v_prediction"), "sdxl": tiny_sdxl, "pixart": tiny_pixart,
         "sd3": tiny_sd3, "flux": lambda out: tiny_flux(out, guidance=True)}
LENGTHS = {"sd3": "[77,16]", "flux": "[16]", "pixart": "[16]"}
PROMPTS = ["a drawing of the digit one", "a photo of two"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory):
    """Tiny pipelines saved with save_pretrained, made once per kind."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = BUILD[kind](tmp_path_factory.mktemp("pipelines") / kind)
        return made[kind]

    return get


def _args(run_dir: Path, data: Path, pipe: Path, *extra: str) -> list[str]:
    return [str(CONFIGS / "smoke_diffusion_finetune.yaml"), f"run_dir={run_dir}", f"data.path={data}",
            f"diffusion.pretrained={pipe}", "track.backends=[jsonl]", *extra]


def _cfg(pipe: Path, data: Path, *extra: str):
    return load_config(CONFIGS / "smoke_diffusion_finetune.yaml", [f"diffusion.pretrained={pipe}", f"data.path={data}",
                                                                    *extra])


# ---------------------------------------------------------------------------------------------- the pipelines' own


def _pipeline_encoding(kind: str, pipe, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token states, pooled) as the diffusers pipeline encodes PROMPTS for its denoiser."""
    if kind.startswith("sd") and kind not in ("sdxl", "sd3"):
        return pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0], None
    if kind == "sdxl":
        out = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        return out[0], out[2]
    if kind == "pixart":
        embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, device="cpu",
                                                max_sequence_length=lengths[0])
        return embeds * mask[..., None], None  # gen_dist zeroes the states its mask hides
    if kind == "sd3":
        out = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False,
                                 max_sequence_length=lengths[1])
        return out[0], out[2]
    embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=lengths[0])
    return embeds, pooled


@pytest.mark.parametrize("kind", ["sd", "sd_v", "sdxl", "pixart", "sd3", "flux"])
def test_the_pipeline_fixes_the_config_and_conditions_as_diffusers_does(kind: str, pipeline, captioned: Path) -> None:
    from diffusers import DiffusionPipeline

    path = pipeline(kind)
    extra = [f"diffusion.text_max_length={LENGTHS[kind]}"] if kind in LENGTHS else []
    d = _cfg(path, captioned, *extra).diffusion
    expect = {"sd": ("unet", "ddpm", "epsilon"), "sd_v": ("unet", "ddpm", "v_prediction"),
              "sdxl": ("unet", "ddpm", "epsilon"), "pixart": ("dit", "ddpm", "epsilon"),
              "sd3": ("mmdit", "flow", "epsilon"), "flux": ("mmdit", "flow", "epsilon")}[kind]
    assert (d.backbone, d.objective, d.prediction) == expect
    assert d.first_stage == str(path / "vae") and d.text_encoder == [str(path)]
    if kind == "sd3":
        assert d.time_shift == 3.0
    pipe = open_pipeline(path)
    encoders = pipe.kind.encoders(pipe, d.text_max_length)
    hidden, _, pooled = encoders(PROMPTS)
    width = text_shape(d)[1]
    ours = torch.cat([torch.nn.functional.pad(h, (0, width - h.shape[2])) for h in hidden], dim=1)
    theirs, their_pooled = _pipeline_encoding(kind, DiffusionPipeline.from_pretrained(path), d.text_max_length)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)
    if their_pooled is not None:
        torch.testing.assert_close(pooled, their_pooled.float(), rtol=1e-5, atol=1e-5)
    if kind == "flux":  # packed latents and their positions as the pipeline makes them
        from diffusers import FluxPipeline

        from gen_dist.pipelines.flux import image_ids, pack, unpack

        x = torch.randn(2, 16, 8, 8)
        torch.testing.assert_close(pack(x), FluxPipeline._pack_latents(x, 2, 16, 8, 8))
        torch.testing.assert_close(unpack(pack(x), x.shape), x)
        torch.testing.assert_close(image_ids(8, 8, x.device, x.dtype),
                                   FluxPipeline._prepare_latent_image_ids(2, 4, 4, x.device, x.dtype))


def test_a_large_models_flops_are_counted_on_fake_tensors(pipeline, captioned: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The FLOP count of a pretrained model runs on shapes alone: the same count, no gradient left behind."""
    from gen_dist import perf
    from gen_dist.family import family

    cfg = _cfg(pipeline("sd"), captioned)
    task = family("diffusion").task(cfg)
    real = perf.flops_per_image(task, task.frozen, (3, 32, 32))
    monkeypatch.setattr(perf, "SHAPES_ONLY_ABOVE", 0)
    assert perf.flops_per_image(task, task.frozen, (3, 32, 32)) == pytest.approx(real, rel=0.01)
    assert all(p.grad is None for p in task.modules["denoiser"].parameters())


# ---------------------------------------------------------------------------------------------- LoRA


def _adapter_effect(tuned, net: torch.nn.Module) -> tuple[float, float]:
    """(largest difference of `net`'s output from the fine-tuned model's, of the pretrained model's from it) on
    one input: the first must be round-off, the second the adapter's own effect."""
    from diffusers import DiffusionPipeline

    torch.manual_seed(0)
    from gen_dist.tasks.latents import latent_shape

    channels, size = latent_shape(tuned.cfg)
    tokens, width, pooled = text_shape(tuned.cfg.diffusion)
    x, t = torch.randn(2, channels, size, size), torch.tensor([700.0, 50.0])
    cond = {"text": torch.randn(2, tokens, width), "text_mask": torch.ones(2, tokens, dtype=torch.long),
            "text_pooled": torch.randn(2, pooled)}
    base = DiffusionPipeline.from_pretrained(tuned.pipe.path)
    base = getattr(base, "unet", None) or base.transformer
    with torch.no_grad():
        ref = tuned.pipe.call(tuned.net, x, t, cond)
        return ((tuned.pipe.call(net.float().eval(), x, t, cond) - ref).abs().max().item(),
                (tuned.pipe.call(base.float().eval(), x, t, cond) - ref).abs().max().item())


def test_lora_under_ddp_zero3_fsdp_agrees_keeps_only_the_adapter_and_exports_load(tmp_path: Path, pipeline,
                                                                                  captioned: Path) -> None:
    """2 ranks of each strategy (FSDP stopped and resumed) reach the same adapter, FSDP's resumes on 1 rank; the
    checkpoints hold the adapter and never the frozen base; every LoRA format loads in diffusers at alpha != rank."""
    pipe = pipeline("sd")
    runs = {}
    for name, extra in {"ddp": [], "zero3": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"],
                        "fsdp": ["parallel.strategy=fsdp"]}.items():
        runs[name] = tmp_path / name
        steps = ["train.steps=2"] if name == "fsdp" else []
        run_cli(*train_command(2, *_args(runs[name], captioned, pipe, *extra, *steps)))
    run_cli(*train_command(2, *_args(runs["fsdp"], captioned, pipe, "parallel.strategy=fsdp")))
    ema = {n: load_file(str(r / "checkpoints" / "step_00000004" / "ema.safetensors")) for n, r in runs.items()}
    assert ema["ddp"] and all(".lora_" in k for k in ema["ddp"])  # the EMA averages the adapter alone
    for name in ("zero3", "fsdp"):
        assert ema[name].keys() == ema["ddp"].keys()
        for k in ema["ddp"]:
            torch.testing.assert_close(ema[name][k], ema["ddp"][k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    base = sum(v.numel() for f in (pipe / "unet").glob("*.safetensors") for v in load_file(str(f)).values())
    for name, run in runs.items():
        held = _stored_elements(run / "checkpoints" / "step_00000004")
        assert 0 < held < base / 4, f"{name}: its checkpoint holds {held} numbers, the base has {base}"
    assert all(".lora_" in k for k in load_file(str(runs["ddp"] / "checkpoints" / "step_00000004" /
                                                    "model.safetensors")))
    # Exports of the EMA adapter, read back by diffusers' own loaders.
    tuned = load_tuned(runs["ddp"])
    assert tuned.lora and (tuned.rank, tuned.alpha) == (4, 8.0)
    for fmt in ("lora", "kohya", "diffusers"):
        out = FORMATS[fmt].write(tuned, tmp_path / f"out_{fmt}")
        diff, effect = _adapter_effect(tuned, FORMATS[fmt].load(out, pipe))
        assert diff < 1e-5 < effect / 100, (fmt, diff, effect)
    meta = _adapter_metadata(tmp_path / "out_lora" / "pytorch_lora_weights.safetensors")
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8.0
    run_cli("sample", str(runs["zero3"]), "--n", "2", "--prompt", PROMPTS[0], "--out", str(tmp_path / "g.png"))
    # The sharded adapter resumes on another number of ranks (the rest of the epoch spread anew).
    run_cli(*train_command(1, *_args(runs["fsdp"], captioned, pipe, "parallel.strategy=fsdp", "train.steps=5",
                                     "train.grad_accum=2")))
    assert [s["world_size"] for s in events(runs["fsdp"], "start")] == [2, 2, 1] and events(runs["fsdp"],
                                                                                             "data_layout_changed")


def test_a_transformer_lora_under_zero2_and_fsdp_agrees_with_ddp(tmp_path: Path, pipeline, captioned: Path) -> None:
    """PixArt's transformer with a LoRA on 2 ranks of DDP, ZeRO-2 and FSDP2 (its blocks the FSDP units, its T5
    encoder outside sharding): the same adapter after 2 steps, and checkpoints that hold the adapter alone."""
    pipe, extra = pipeline("pixart"), [f"diffusion.text_max_length={LENGTHS['pixart']}", "train.steps=2"]
    strategies = {"ddp": [], "zero2": ["parallel.strategy=deepspeed", "parallel.zero_stage=2"],
                  "fsdp": ["parallel.strategy=fsdp"]}
    ema = {}
    for name, more in strategies.items():
        run = tmp_path / name
        run_cli(*train_command(2, *_args(run, captioned, pipe, *extra, *more)))
        ema[name] = load_file(str(run / "checkpoints" / "step_00000002" / "ema.safetensors"))
        assert ema[name] and all(".lora_" in k for k in ema[name]), name
    for name in ("zero2", "fsdp"):
        assert ema[name].keys() == ema["ddp"].keys()
        for k in ema["ddp"]:
            torch.testing.assert_close(ema[name][k], ema["ddp"][k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    # the adapter, its EMA and optimizer states (and DeepSpeed's fp32 copy), never the frozen base
    base = sum(v.numel() for f in (pipe / "transformer").glob("*.safetensors") for v in load_file(str(f)).values())
    adapter = sum(v.numel() for v in ema["ddp"].values())
    for name in strategies:
        held = _stored_elements(tmp_path / name / "checkpoints" / "step_00000002")
        assert adapter <= held <= 8 * adapter < base, f"{name}: {held} numbers, adapter {adapter}, base {base}"


def _stored_elements(ckpt: Path) -> int:
    """Numbers in a checkpoint's tensors, whatever wrote them (safetensors, torch distributed checkpoints,
    DeepSpeed's model and optimizer states)."""
    from torch.distributed.checkpoint import FileSystemReader

    def numel(obj) -> int:
        if torch.is_tensor(obj):
            return obj.numel()
        items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else []
        return sum(numel(v) for v in items)

    total = sum(numel(load_file(str(f))) for f in ckpt.rglob("*.safetensors"))
    for meta in ckpt.rglob(".metadata"):
        entries = FileSystemReader(str(meta.parent)).read_metadata().state_dict_metadata.values()
        total += sum(torch.Size(e.size).numel() for e in entries if hasattr(e, "size"))
    return total + sum(numel(torch.load(f, weights_only=False)) for f in ckpt.rglob("*states.pt"))


def _adapter_metadata(path: Path) -> dict:
    """The adapter config that diffusers writes into a LoRA file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return json.loads(next(v for k, v in meta.items() if "adapter_metadata" in k))


@pytest.mark.parametrize("kind", ["sdxl", "pixart", "sd3", "flux"])
def test_every_lora_format_of_each_pipeline_loads_at_its_alpha(kind: str, tmp_path: Path, pipeline,
                                                               captioned: Path) -> None:
    """An adapter with alpha = 2 x rank and random up projections (so that it matters), written in each of the
    pipeline's LoRA formats and read back by diffusers (or peft) onto the pretrained pipeline."""
    from gen_dist.formats import Tuned
    from gen_dist.tasks.finetune import pretrained_denoiser

    extra = [f"diffusion.text_max_length={LENGTHS[kind]}"] if kind in LENGTHS else []
    cfg = _cfg(pipeline(kind), captioned, *extra)
    net = pretrained_denoiser(cfg)
    torch.manual_seed(1)
    for name, p in net.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    tuned = Tuned(cfg, open_pipeline(cfg.diffusion.pretrained), net.eval())
    for fmt in tuned.pipe.kind.lora_formats:
        out = FORMATS[fmt].write(tuned, tmp_path / fmt)
        diff, effect = _adapter_effect(tuned, FORMATS[fmt].load(out, tuned.pipe.path))
        assert diff < 1e-5 < effect / 100, (fmt, diff, effect)


def test_lora_kill9_then_resume_equals_uninterrupted(tmp_path: Path, pipeline, captioned: Path) -> None:
    pipe = pipeline("sd")
    extra = (f"diffusion.pretrained={pipe}", "data.batch_size=2",
             "diffusion.lora_dropout=0.1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_command("diffusion_finetune", straight, captioned, 2, extra), cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "WANDB_MODE": "disabled"})
    rng = random.Random("lora")
    assert _kill_during_training(_command("diffusion_finetune", killed, captioned, 2, extra), killed, rng)
    run_cli(*_command("diffusion_finetune", killed, captioned, 2, extra)[3:])
    a, b = _state(straight), _state(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(".lora_" in k.split(":")[-1] for k in a if k.startswith(("model.", "ema.")))
    assert len(_keys(straight)) == STEPS * 2 and _keys(straight) == _keys(killed)


def test_the_pipelines_encoders_write_the_text_cache_that_training_reads(tmp_path: Path, pipeline,
                                                                          captioned: Path) -> None:
    """`gen-dist data text-embeddings --encoder PIPELINE` on 2 ranks: the stored encodings are the pipeline's own
    (SD3's two token sequences); `gen-dist data latents PIPELINE` keeps the captions beside the latents; a LoRA
    trains on both caches; a run of another pipeline refuses the embeddings, one with another VAE the latents,
    before launch."""
    import webdataset as wds

    pipe, emb = pipeline("sd3"), tmp_path / "emb"
    run_cli("data", "text-embeddings", str(captioned), "--encoder", str(pipe), "--max-length", "77", "--max-length",
            "16", "--out", str(emb), "--nproc", "2")
    sample = next(iter(wds.WebDataset(str(sorted(emb.glob("*.tar"))[0]), shardshuffle=False)))
    caption = next(iter(wds.WebDataset(str(sorted(captioned.glob("train-*.tar"))[0]), shardshuffle=False)))["txt"]
    opened = open_pipeline(pipe)
    hidden, _, pooled = opened.kind.encoders(opened, [77, 16])([caption.decode()])
    for i, h in enumerate(hidden):
        stored = torch.from_numpy(np.load(io.BytesIO(sample[f"text{i}.npy"])).astype(np.float32))
        torch.testing.assert_close(stored, h[0], rtol=1e-2, atol=1e-3)  # float16 in the cache
    # The latents too, by the pipeline's VAE: training then runs neither the encoders nor the VAE's encoder.
    run_cli("data", "latents", str(pipe), "--data", str(captioned), "--resolution", "32", "--out", str(tmp_path / "z"))
    cached = [f"data.text_embeddings={emb}", f"data.latents={tmp_path / 'z'}", "data.hflip=false",
              "diffusion.text_max_length=[77,16]", "train.steps=1"]
    run_cli(*train_command(1, *_args(tmp_path / "run", captioned, pipe, *cached)))
    with pytest.raises(ConfigError, match="data.text_embeddings: .* was encoded by"):
        _cfg(pipeline("flux"), captioned, f"data.text_embeddings={emb}", "diffusion.text_max_length=[16]")
    other = _broken(pipe, tmp_path, _perturb_vae)
    proc = run_cli(*train_command(2, *_args(tmp_path / "other", captioned, other, *cached[1:])), check=False)
    assert proc.returncode and "was encoded by" in proc.stderr and "differ from diffusion.first_stage" in proc.stderr
    assert not (tmp_path / "other" / "metrics.jsonl").exists()  # refused before any process trained


# ---------------------------------------------------------------------------------------------- full fine-tuning


def test_full_finetune_of_a_unet_and_a_transformer_exports_what_diffusers_loads(tmp_path: Path, pipeline,
                                                                                captioned: Path) -> None:
    sd, flux = pipeline("sd"), pipeline("flux")
    full = ["diffusion.lora_rank=0", "diffusion.lora_alpha=0", "train.steps=2"]
    run_cli(*train_command(1, *_args(tmp_path / "sd", captioned, sd, *full)))
    run_cli(*train_command(2, *_args(tmp_path / "flux", captioned, flux, *full, "parallel.strategy=fsdp",
                                     "diffusion.text_max_length=[16]")))
    for run, formats in ((tmp_path / "sd", ("diffusers", "single-file")), (tmp_path / "flux", ("diffusers",))):
        tuned = load_tuned(run)
        assert not tuned.lora
        for fmt in formats:
            out = FORMATS[fmt].write(tuned, tmp_path / f"{run.name}_{fmt}")
            diff, effect = _adapter_effect(tuned, FORMATS[fmt].load(out, Path(tuned.cfg.diffusion.pretrained)))
            assert diff < 1e-5 < effect / 100, (run.name, fmt, diff, effect)
    proc = run_cli("export", str(tmp_path / "flux"), "--format", "kohya", "--out", str(tmp_path / "k"), check=False)
    assert proc.returncode != 0 and "--format kohya does not fit a full fine-tune of a FluxPipeline" in proc.stderr


# ---------------------------------------------------------------------------------------------- bad input


def _broken(pipe: Path, tmp: Path, change) -> Path:
    out = shutil.copytree(pipe, tmp / "broken", dirs_exist_ok=True)
    change(out)
    return out


def _perturb_vae(out: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out / "vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(0.01)
    vae.save_pretrained(out / "vae")


def _set_class(out: Path, cls: str) -> None:
    index = json.loads((out / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps({**index, "_class_name": cls}))


@pytest.mark.parametrize(("case", "message"), [
    ("not a pipeline", "is not a diffusers pipeline directory"),
    ("unsupported class", "holds a KandinskyPipeline, which gen_dist does not fine-tune; supported: "
                          "StableDiffusionPipeline"),
    ("no tokenizer", "lacks its tokenizer"),
    ("targets", r"diffusion.lora_targets \['to_qkv'\] match no layer .* e.g. "),
    ("resolution", "data.resolution 30 must be divisible by|must be divisible by 2 for 2 UNet levels"),
    ("contradiction", "diffusion.prediction='v_prediction' contradicts diffusion.pretrained"),
    ("lengths", r"a StableDiffusion3Pipeline encodes 2 token sequence\(s\)"),
    ("lora without pipeline", "diffusion.lora_rank needs diffusion.pretrained"),
])
def test_bad_pipelines_and_settings_are_named_before_launch(case: str, message: str, tmp_path: Path, pipeline,
                                                            captioned: Path) -> None:
    pipe, extra = pipeline("sd"), []
    if case == "not a pipeline":
        pipe = pipe / "unet"
    elif case == "unsupported class":
        pipe = _broken(pipe, tmp_path, lambda out: _set_class(out, "KandinskyPipeline"))
    elif case == "no tokenizer":
        pipe = _broken(pipe, tmp_path, lambda out: shutil.rmtree(out / "tokenizer"))
    elif case == "targets":
        extra = ["diffusion.lora_targets=[to_qkv]"]
    elif case == "resolution":
        extra = ["data.resolution=30"]
    elif case == "contradiction":
        extra = ["diffusion.prediction=v_prediction"]
    elif case == "lengths":
        pipe, extra = pipeline("sd3"), ["diffusion.text_max_length=[16]"]
    else:
        pipe = ""
    with pytest.raises(ConfigError, match=message):
        _cfg(pipe, captioned, *extra)
