import dataclasses
import typing

import pytest

from common.config import (
    Config,
    ConfigError,
    LoraConfig,
    config_hash,
    config_to_toml,
    load_config,
    parse_overrides,
)


def test_defaults_are_valid_and_frozen():
    cfg = load_config()
    assert cfg == Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sampling.temperature = 2.0  # type: ignore[misc]


def test_precedence_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[sampling]\ntemperature = 0.5\nmax_new_tokens = 32\n[model]\nname = "tiny"\n')
    cfg = load_config(path, ["sampling.temperature=0.9", "lora.keys=self_attn.q_proj,self_attn.v_proj"])
    assert cfg.sampling.temperature == 0.9  # override beats file
    assert cfg.sampling.max_new_tokens == 32  # file beats default
    assert cfg.model.name == "tiny"
    assert cfg.lora.rank == LoraConfig().rank  # default kept
    assert cfg.lora.keys == ("self_attn.q_proj", "self_attn.v_proj")


def test_zero_seed_is_honoured():
    assert load_config(None, ["run.seed=0"]).run.seed == 0


def test_every_problem_is_listed_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        '[sampling]\ntemperature = 0\nmax_new_tokens = 0\nbatch_size = "many"\n[nonsense]\nx = 1\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, ["lora.rank=0", "lora.colour=3"])
    text = str(err.value)
    for fragment in ("sampling.batch_size: expected an integer", "unknown section [nonsense]", "lora.colour"):
        assert fragment in text
    # Type errors stop construction before range checks; fix them and the range problems are all listed.
    with pytest.raises(ConfigError) as err:
        load_config(
            None, ["sampling.temperature=0", "sampling.max_new_tokens=0", "lora.rank=0", "model.dtype=int8"]
        )
    assert len(err.value.problems) == 4


def test_a_removed_setting_is_named_with_what_became_of_it(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text("[sampling]\ntop_k = 0\ntop_p = 1.0\nseed = 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert [p.split(":")[0] for p in err.value.problems] == [
        "unknown setting sampling.top_k",
        "unknown setting sampling.top_p",
        "unknown setting sampling.seed",
    ]
    assert "removed" in str(err.value) and "delete the line" in str(err.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["temperature=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "broken.toml").write_text("[sampling\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")


def test_toml_round_trip_and_hash(tmp_path):
    cfg = load_config(None, ["sampling.temperature=0.7", "lora.keys=self_attn.q_proj", 'model.name="tiny"'])
    path = tmp_path / "resolved.toml"
    path.write_text(config_to_toml(cfg))
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(None, ["sampling.temperature=0.8"])) != config_hash(cfg)
    # Where a run writes its files does not change what it computes.
    assert config_hash(load_config(path, ['run.run_dir="elsewhere"'])) == config_hash(cfg)


def test_learner_backend_is_one_mlx_distributed_knows():
    from common.config import ConfigError, load_config

    assert load_config(None, ['run.backend="jaccl"']).run.backend == "jaccl"
    with pytest.raises(ConfigError, match="run.backend='gloo'"):
        load_config(None, ['run.backend="gloo"'])


@pytest.mark.parametrize(
    "setting", ["lora.alpha=nan", "ppo.vf_coef=inf", "run.reward_timeout_s=-inf", "ppo.clip_coef=nan"]
)
def test_non_finite_numbers_are_refused(setting):
    """Attack table row 11 (issue 15): NaN and Inf were accepted; the run then stalled blaming the reward."""
    with pytest.raises(ConfigError, match="is not a finite number"):
        load_config(None, [setting])


def _modes() -> list[tuple[str, tuple[str, ...]]]:
    """Every setting typed as a Literal, with its allowed values."""
    out = []
    for section in dataclasses.fields(Config):
        for name, kind in typing.get_type_hints(type(getattr(Config(), section.name))).items():
            if typing.get_origin(kind) is typing.Literal:
                out.append((f"{section.name}.{name}", typing.get_args(kind)))
    return out


@pytest.mark.parametrize(("setting", "allowed"), _modes())
def test_every_mode_takes_its_typed_values_and_refuses_others(setting, allowed):
    assert len(_modes()) >= 12
    for value in allowed:
        section, key = setting.split(".")
        extra = ["ppo.algorithm=grpo"] if setting in ("ppo.advantage_norm", "ppo.policy_ratio") else []
        extra += ["ppo.loss_aggregation=seq_mean_token_mean"] if setting == "ppo.policy_ratio" else []
        cfg = load_config(None, [*extra, f'{setting}="{value}"'])
        assert getattr(getattr(cfg, section), key) == value
    with pytest.raises(ConfigError) as err:
        load_config(None, [f'{setting}="nonsense"'])
    assert f"{setting}='nonsense'" in str(err.value)
