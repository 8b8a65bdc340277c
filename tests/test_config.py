import pytest

from limo.engine.config import Config, ConfigError, describe_keys, load_config
from tests.conftest import ROOT


def test_recipes_load_and_validate():
    for recipe in sorted((ROOT / "configs").glob("*.toml")):
        cfg = load_config(recipe)
        assert isinstance(cfg, Config)
    demo = load_config(ROOT / "configs/demo.toml")
    assert demo.model.preset == "tiny" and demo.data.path == "synthetic"
    limo = load_config(ROOT / "configs/limo_qwen2.5_32b_8xh100.toml")
    assert (limo.data.max_tokens, limo.data.samples_per_step, limo.train.epochs, limo.optim.lr) == (16384, 32, 15, 5e-6)


def test_dotted_overrides_are_typed():
    cfg = load_config(
        ROOT / "configs/demo.toml",
        ["--train.max_steps=4", "--optim.lr", "1e-4", "--checkpoint.resume=false", "--model.path=none",
         "--eval.benchmarks=aime24,math500", "--data.system_prompt=Think.", "--optim.weight_decay=0"],
    )
    assert cfg.train.max_steps == 4 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == 1e-4 and cfg.checkpoint.resume is False and cfg.model.path is None
    assert cfg.eval.benchmarks == ["aime24", "math500"] and cfg.data.system_prompt == "Think."
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)


def test_the_command_line_model_replaces_the_recipes():
    """model.path and model.preset are one choice: naming one on the command line drops the recipe's other."""
    from_folder = load_config(ROOT / "configs/demo.toml", ["--model.path=/models/qwen"])
    assert (from_folder.model.path, from_folder.model.preset) == ("/models/qwen", None)
    small = load_config(ROOT / "configs/limo_qwen2.5_32b_8xh100.toml", ["--model.preset=tiny"])
    assert (small.model.path, small.model.preset) == (None, "tiny")
    explicit = load_config(ROOT / "configs/limo_qwen2.5_32b_8xh100.toml", ["--model.path=none", "--model.preset=qwen2.5-32b"])
    assert (explicit.model.path, explicit.model.preset) == (None, "qwen2.5-32b")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.max_step=4"], "unknown key 'train.max_step' (did you mean 'train.max_steps'?)"),
        (["--trian.epochs=1"], "unknown key 'trian.epochs'"),
        (["--train.max_steps=four"], "train.max_steps = 'four' is not int"),
        (["--train.dtype=float16"], "train.dtype = 'float16' is not one of 'bfloat16', 'float32'"),
        (["--optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
        (["--optim.warmup_ratio=2"], "optim.warmup_ratio=2.0 must lie in [0, 1]"),
        (["--model.preset=gpt5"], "model.preset: unknown preset 'gpt5'"),
        (["--model.path=/m", "--model.preset=tiny"], "model.path and model.preset both given; set exactly one of them"),
        (["--model.preset=none"], "set exactly one of model.preset and model.path"),
        (["--data.tokens_per_microbatch=256"], "data.tokens_per_microbatch=256 is smaller than data.max_tokens=512"),
        (["train.max_steps=4"], "expected --section.key=value"),
        (["--train.max_steps"], "has no value"),
        (["--optim.lr=inf"], "optim.lr=inf must be a finite number"),
        (["--optim.lr=nan"], "optim.lr=nan must be a finite number"),
        (["--optim.beta2=nan"], "optim.beta2=nan must be a finite number"),
        (["--optim.eps=-inf"], "optim.eps=-inf must be a finite number"),
        (["--optim.weight_decay=inf"], "optim.weight_decay=inf must be a finite number"),
        (["--optim.weight_decay=400"], "optim.weight_decay=400.0 times optim.lr=0.003 must be < 1"),
        (["--train.max_grad_norm=nan"], "train.max_grad_norm=nan must be a finite number"),
        (["--model.init_std=inf"], "model.init_std=inf must be a finite number"),
        (["--eval.temperature=nan"], "eval.temperature=nan must be a finite number"),
        (["--checkpoint.override=optim.lr,data.path"], "checkpoint.override names 'data.path'; allowed: optim.lr,"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.toml", overrides)
    assert message in str(e.value)


def test_bad_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nepochs = "many"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: train.epochs = 'many' is not int"):
        load_config(bad)
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    bad.write_text("epochs = 3\n")
    with pytest.raises(ConfigError, match="top-level key 'epochs' must be a table"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_help_lists_every_key():
    text = describe_keys()
    for key in ("--model.preset", "--train.max_steps", "--optim.lr", "--parallel.activation_checkpointing", "--eval.benchmarks"):
        assert key in text
