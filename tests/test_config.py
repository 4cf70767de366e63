from pathlib import Path

import pytest
from conftest import CONFIGS, run_cli

from gen_dist.config import load_config
from gen_dist.family import families
from gen_dist.parsing import read_yaml
from gen_dist.schema import ConfigError


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name: str, text_encoder: Path) -> None:
    text = (CONFIGS / name).read_text()
    # Text encoders are downloaded or linked by the demo's set-up: a tiny one stands in.
    encoders = len(read_yaml(text).get("diffusion", {}).get("text_encoder", []))
    encoder = [f"diffusion.text_encoder=[{','.join([str(text_encoder)] * encoders)}]",
               "diffusion.text_max_length=[16]"] if encoders else []
    if "pretrained:" in text:  # fine-tuning names a pipeline to download (or, for the demo, to make) first
        with pytest.raises(ConfigError, match="diffusion.pretrained: .* is not a diffusers pipeline directory"):
            load_config(CONFIGS / name, ["diffusion.pretrained=models/not_downloaded_yet"])
        return
    if "first_stage:" in text:  # latent diffusion names a first stage to train before it
        with pytest.raises(ConfigError, match="diffusion.first_stage: .* does not exist"):
            load_config(CONFIGS / name, ["diffusion.first_stage=runs/not_trained_yet", *encoder])
        return
    cfg = load_config(CONFIGS / name, encoder)
    assert cfg.task in families() and cfg.task in name


def test_overrides_take_precedence_and_are_typed() -> None:
    cfg = load_config(CONFIGS / "smoke_gan.yaml", ["train.steps=17", "optim.lr=1e-3", "gan.channels=[8, 8]",
                                                   "data.hflip=true", "optim.weight_decay=0"])
    assert cfg.train.steps == 17
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.gan.channels == [8, 8]
    assert cfg.data.hflip is True
    assert isinstance(cfg.optim.weight_decay, float)


@pytest.mark.parametrize(("override", "needle"), [
    ("train.stepz=3", "train.stepz"),
    ("train.steps=ten", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("data.hflip=3", "data.hflip"),
    ("gan.channels=[8, x]", "gan.channels[1]"),
    ("task=flow", "task"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("data.batch_size=0", "data.batch_size"),
    ("train=3", "train"),
    ("nonsense", "key=value"),
    ("optim.lr=nan", "'optim.lr' must be a finite number"),
    ("gan.r1_gamma=.inf", "'gan.r1_gamma' must be a finite number"),
    ("train.seed=-1", "'train.seed' must be >= 0"),
    ("data.num_workers=-2", "'data.num_workers' must be >= 0"),
    ("diffusion.train_timesteps=0", "'diffusion.train_timesteps' must be > 0"),
    ("name=../elsewhere", "'name' must be a plain name"),
    ("track.backends=[tensorboard, mlflow]", "'track.backends' must list distinct entries"),
    ("parallel.timeout_minutes=0", "'parallel.timeout_minutes' must be > 0"),
    ("train.snapshot_every=-5", "'train.snapshot_every' must be >= 0"),
    ("train.keep_best=eval/inception/fid1k", "needs in-training evaluation: set eval.every > 0"),
    ("train.mixed_precision=yes", "'train.mixed_precision' must be one of no, bf16, fp16, auto, got 'yes'"),
    ("optim.lr=-1e-4", "'optim.lr' must be >= 0"),
    ("optim.betas=[0.9, 1.0]", "'optim.betas' must both be in"),
    ("optim.weight_decay=-0.1", "'optim.weight_decay' must be >= 0"),
    ("optim.grad_clip=-1", "'optim.grad_clip' must be >= 0"),
])
def test_bad_values_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(CONFIGS / "smoke_gan.yaml", [override])


def test_a_yaml_word_means_the_word_for_a_string_key(tmp_path: Path) -> None:
    """YAML 1.1 reads no/yes/on/off as booleans; a config key of type str takes the word itself, a bool key its
    truth value, on the command line and in files alike."""
    cfg = load_config(CONFIGS / "smoke_gan.yaml", ["train.mixed_precision=no", "data.hflip=yes", "train.compile=off"])
    assert (cfg.train.mixed_precision, cfg.data.hflip, cfg.train.compile) == ("no", True, "off")
    path = tmp_path / "words.yaml"
    path.write_text("task: vae\ntrain:\n  mixed_precision: no\n  tf32: off\n  compile: on\ndata:\n  hflip: On\n")
    cfg = load_config(path)
    assert (cfg.train.mixed_precision, cfg.train.tf32, cfg.train.compile, cfg.data.hflip) == ("no", False, "on", True)
    with pytest.raises(ConfigError, match="'data.hflip' must be bool, got str 'maybe'"):
        load_config(path, ["data.hflip=maybe"])


@pytest.mark.parametrize(("flags", "chose"), [({"avx2", "avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"),
                                              ({"avx2", "fma"}, "no")])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch: pytest.MonkeyPatch, flags: set[str],
                                                                chose: str) -> None:
    from gen_dist import perf

    monkeypatch.setattr(perf, "cpu_flags", lambda: flags)
    cfg = load_config(CONFIGS / "smoke_gan.yaml", ["train.mixed_precision=auto", "train.cpu=true"])
    choice = perf.choose_precision(cfg)
    assert choice["asked"] == "auto" and choice["chose"] == chose and choice["why"]
    cfg.train.mixed_precision = "bf16"
    assert perf.choose_precision(cfg) == {"asked": "bf16", "chose": "bf16", "why": "set in the config"}


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: vae\nvae:\n  latent: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'vae.latent'"):
        load_config(bad)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("no/such/config.yaml")


def test_keep_best_must_name_a_logged_metric() -> None:
    base = ["eval.every=10", "eval.n=500", "eval.metrics=[fid,pr]", "eval.extractors=[inception]"]
    cfg = load_config(CONFIGS / "smoke_gan.yaml", [*base, "train.keep_best=eval/inception/recall500"])
    assert cfg.train.keep_best == "eval/inception/recall500"
    with pytest.raises(ConfigError, match="eval/inception/fid1k is not a metric .* it logs eval/inception/fid500, "
                                          "eval/inception/precision500, eval/inception/recall500"):
        load_config(CONFIGS / "smoke_gan.yaml", [*base, "train.keep_best=eval/inception/fid1k"])


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        load_config(CONFIGS / "smoke_vae.yaml", ["data.resolution=10"])
    with pytest.raises(ConfigError, match="same length"):
        load_config(CONFIGS / "smoke_diffusion.yaml", ["diffusion.attention=[true]"])
    with pytest.raises(ConfigError, match="loss_scaling=false cannot train a GAN"):
        load_config(CONFIGS / "smoke_gan.yaml", ["train.mixed_precision=fp16", "train.loss_scaling=false"])


@pytest.mark.parametrize("command", ["train", "launch"])
def test_cli_fails_before_training(command: str, tmp_path: Path, digits: Path) -> None:
    run_dir = tmp_path / "run"
    args = [command, str(CONFIGS / "smoke_vae.yaml"), f"run_dir={run_dir}", f"data.path={digits}"]
    proc = run_cli(*args, "vae.latent_dimm=3", check=False)
    assert proc.returncode == 2
    assert "unknown config key 'vae.latent_dimm'" in proc.stderr
    assert not run_dir.exists()
    proc = run_cli(*args, "data.path=/no/such/data", check=False)
    assert proc.returncode == 2 and "data.path /no/such/data does not exist" in proc.stderr
    proc = run_cli(*args, "train.mixed_precision=fp16", check=False)
    assert proc.returncode == 2 and "fp16 needs a GPU" in proc.stderr
    gan = [command, str(CONFIGS / "smoke_gan.yaml"), *args[2:]]
    proc = run_cli(*gan, "train.mixed_precision=fp16", "train.loss_scaling=false", check=False)
    assert proc.returncode == 2 and "cannot train a GAN" in proc.stderr
    if command == "launch":  # 5 shards cannot feed 8 ranks
        proc = run_cli(*args, "--nproc", "8", check=False)
        assert proc.returncode == 2 and "has 5 shards for 8 ranks x 1 workers" in proc.stderr
    assert not run_dir.exists()


def test_cli_rejects_class_count_the_data_lacks(tmp_path: Path, digits: Path) -> None:
    for count in (12, 5):  # more classes than the data has, or fewer than its labels reach
        proc = run_cli("launch", str(CONFIGS / "smoke_gan.yaml"), f"run_dir={tmp_path / 'r'}", f"data.path={digits}",
                       f"gan.num_classes={count}", "--dry-run", check=False)
        assert proc.returncode == 2 and f"gan.num_classes={count} but" in proc.stderr, proc.stderr
        assert "has 10 classes (labels 0 .. 9)" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("launch", str(CONFIGS / "smoke_autoencoder.yaml"), f"run_dir={tmp_path / 'a'}",
                   f"data.path={digits}", "train.sample_n=400", "--dry-run", check=False)
    assert proc.returncode == 2 and "train.sample_n=400: autoencoder grids reconstruct images of" in proc.stderr


@pytest.mark.parametrize(("config", "overrides", "needle"), [
    ("diffusion", ["diffusion.channels=[12, 24]"], "'diffusion.channels' must be multiples of diffusion.norm_groups"),
    ("diffusion", ["diffusion.channels=[]", "diffusion.attention=[]"], "'diffusion.channels' must not be empty"),
    ("diffusion", ["diffusion.head_dim=64"], "diffusion.head_dim=64 is wider than the 32 channels"),
    ("diffusion", ["diffusion.sample_steps=2000"], "diffusion.sample_steps=2000 must be <= diffusion.train_timesteps"),
    ("diffusion", ["diffusion.backbone=dit", "diffusion.dit_heads=3", "diffusion.dit_head_dim=10"], "multiple of 4"),
    ("diffusion", ["diffusion.objective=edm", "diffusion.rho=0.5"], "diffusion.rho must be >= 1"),
    ("diffusion", ["diffusion.ddim_eta=-1"], "'diffusion.ddim_eta' must be >= 0"),
    ("gan", ["gan.channels=[24, 12]"], "'gan.channels' must hold multiples of 8"),
    ("gan", ["gan.r1_gamma=-1"], "'gan.r1_gamma' must be >= 0"),
    ("gan", ["data.shuffle_buffer=0"], "'data.shuffle_buffer' must be > 0"),
    ("gan", ["eval.n=1"], "eval.n and eval.reference_n (unless 0, the whole split) must be >= 2"),
    ("autoencoder", ["autoencoder.channels=[]"], "'autoencoder.channels' must not be empty"),
    ("autoencoder", ["autoencoder.disc_channels=[8, 12]"], "after the first must be multiples of 8"),
    ("autoencoder", ["autoencoder.disc_channels=[8, 16, 32, 64]"], "too many for data.resolution 8"),
    ("autoencoder", ["train.sample_n=15"], "train.sample_n=15 must be a multiple of 10 for autoencoder"),
    ("vqvae", ["vqvae.codebook_size=1"], "'vqvae.codebook_size' must be >= 2"),
    ("vqvae", ["vqvae.commitment=-1"], "'vqvae.commitment' must be >= 0"),
    ("classifier", ["classifier.channels=[12]"], "'classifier.channels' must be multiples of 8"),
])
def test_values_the_libraries_would_refuse_fail_before_launch(config: str, overrides: list[str], needle: str) -> None:
    """Each of these passed the checks once and then failed in torch or diffusers after the ranks were up."""
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(CONFIGS / f"smoke_{config}.yaml", overrides)


@pytest.mark.parametrize(("args", "needle"), [
    (["sample", "runs/x", "--n", "0"], "argument --n: must be an integer >= 1, got 0"),
    (["sample", "runs/x", "--guidance", "nan"], "argument --guidance: must be a finite number"),
    (["sample", "runs/x", "--steps", "-3"], "argument --steps: must be an integer >= 1, got -3"),
    (["eval", "runs/x", "--nproc", "0"], "argument --nproc: must be an integer >= 1, got 0"),
    (["data", "digits", "--out", "x", "--shard-size", "0"], "argument --shard-size: must be an integer >= 1"),
    (["launch", "configs/smoke_vae.yaml", "--nproc", "two"], "argument --nproc: must be an integer, got 'two'"),
    (["status", "runs/x", "--watch", "0"], "argument --watch: must be a positive number of seconds"),
    (["status", "no/such/run"], "no/such/run is not a directory"),
    (["eval", "configs", "--snapshots"], "--snapshots needs a run directory; configs has no config.yaml"),
    (["slurm", "submit-eval", "no/such/run", "--snapshots"], "no/such/run does not exist"),
])
def test_bad_command_line_values_fail_before_any_work(args: list[str], needle: str) -> None:
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
