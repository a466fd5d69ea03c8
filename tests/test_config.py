from __future__ import annotations

import hashlib
import json

import pytest

from megacontext.config import Config, config_hash, load_config, parse_override
from megacontext.errors import ConfigError


@pytest.mark.parametrize("profile", ["tiny", "default", "gate-8k", "gate-8k-cpu"])
def test_every_profile_resolves(profile: str) -> None:
    cfg = load_config(profile, env={})
    assert cfg.profile == profile


def test_profiles_differ_only_where_they_say() -> None:
    tiny, default = load_config("tiny", env={}), load_config("default", env={})
    assert default == Config(profile="default")  # the defaults in code are the default profile
    assert tiny.model.kind == "tiny" and default.model.kind == "smollm2"
    assert tiny.data.min_doc_tokens == default.data.min_doc_tokens


def test_the_cpu_gate_8k_recipe_is_gate_8k_on_fewer_samples_in_fp32() -> None:
    full, cpu = load_config("gate-8k", env={}), load_config("gate-8k-cpu", env={})
    assert (full.model.dtype, cpu.model.dtype) == ("bfloat16", "float32")
    same = ("data", "wc", "gistnet", "lensnet", "allocator", "train", "mega")
    assert all(getattr(full, s) == getattr(cpu, s) for s in same)  # same corpus, budget and cycle
    assert cpu.eval.model_dump(exclude={"max_docs", "windows_per_doc", "cursors_per_window", "passkey"}) == \
        full.eval.model_dump(exclude={"max_docs", "windows_per_doc", "cursors_per_window", "passkey"})
    assert cpu.eval.passkey.lengths == full.eval.passkey.lengths == [32_704]


def test_slot_widths_are_checked_only_where_they_are_used() -> None:
    assert load_config("tiny", ["wc.levels=3"], env={}).wc.levels == 3  # absolute positions: widths unused
    with pytest.raises(ConfigError, match="compressed positions need slot_widths for every level 0..3"):
        load_config("tiny", ["wc.levels=3", "wc.positions=compressed"], env={})
    assert load_config("tiny", ["wc.levels=3", "wc.positions=compressed", "wc.slot_widths=[1,2,4,8]"], env={})
    with pytest.raises(ConfigError, match="start with 1"):
        load_config("tiny", ["wc.slot_widths=[2,2,4]"], env={})


def test_the_attention_sink_is_whole_blocks_that_leave_room() -> None:
    assert load_config("tiny", ["wc.sink_tokens=64"], env={}).wc.sink_tokens == 64
    assert load_config("tiny", [], env={}).wc.sink_tokens == 32  # on by default: one block
    assert load_config("default", [], env={}).wc.sink_tokens == 32
    for bad in ("wc.sink_tokens=40", "wc.sink_tokens=-32", "wc.sink_tokens=4096"):
        with pytest.raises(ConfigError, match="sink_tokens"):
            load_config("tiny", [bad], env={})
    tiny = load_config("tiny", [], env={})
    too_big = tiny.train.budget - tiny.wc.protected_tail - 32  # fits W_max, not the training budget
    with pytest.raises(ConfigError, match="train.budget"):
        load_config("tiny", [f"wc.sink_tokens={too_big // 32 * 32}"], env={})
    # no sink leaves the key out: a cycle trained before the option keeps its hash when read with sink 0
    no_sink = load_config("tiny", ["wc.sink_tokens=0"], env={})
    data = no_sink.to_dict()
    for section, key in (("paths", None), ("profile", None), ("model", "device"), ("allocator", "room_slack"),
                         ("wc", "sink_tokens"), ("train", "teacher_debias")):
        data.pop(section) if key is None else data[section].pop(key)
    assert config_hash(no_sink) == hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    assert config_hash(tiny) != config_hash(no_sink)
    windows = ["wc.sink_tokens=0", "train.teacher_windows=2"]
    assert config_hash(load_config("tiny", windows, env={})) != config_hash(
        load_config("tiny", [*windows, "train.teacher_debias=true"], env={}))
    with pytest.raises(ConfigError, match="teacher_windows >= 2"):
        load_config("tiny", ["train.teacher_debias=true", "train.teacher_windows=1"], env={})


def test_overrides_are_parsed_as_yaml_scalars() -> None:
    assert parse_override("data.val_fraction=0.2") == ("data.val_fraction", 0.2)
    assert parse_override("data.max_documents=null") == ("data.max_documents", None)
    cfg = load_config("tiny", ["data.max_documents=3", "model.tiny.n_layers=1", "seed=7"], env={})
    assert (cfg.data.max_documents, cfg.model.tiny.n_layers, cfg.seed) == (3, 1, 7)


def test_unknown_key_names_the_key_and_suggests() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.max_docments'.*did you mean 'data\.max_documents'"):
        load_config("tiny", ["data.max_docments=3"], env={})


def test_bad_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"config key 'data\.val_fraction'.*less than 1"):
        load_config("tiny", ["data.val_fraction=1.5"], env={})
    with pytest.raises(ConfigError, match=r"config key 'model\.kind'"):
        load_config("tiny", ["model.kind=gpt5"], env={})
    with pytest.raises(ConfigError, match=r"config key 'model\.tiny' from override 'model\.tiny\.n_heads=3'.*n_heads"):
        load_config("tiny", ["model.tiny.n_heads=3"], env={})


def test_a_bad_environment_variable_is_named_not_only_its_key() -> None:
    with pytest.raises(ConfigError, match=r"config key 'seed' from environment variable MEGACONTEXT_SEED='abc'"):
        load_config("tiny", env={"MEGACONTEXT_SEED": "abc"})
    with pytest.raises(ConfigError, match=r"from environment variable MEGACONTEXT_SEED='\[1'"):  # not YAML either
        load_config("tiny", env={"MEGACONTEXT_SEED": "[1"})
    with pytest.raises(ConfigError, match=r"config key 'data\.val_fraction' from override 'data\.val_fraction=1\.5'"):
        load_config("tiny", ["data.val_fraction=1.5"], env={})


def test_value_key_used_as_section_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'seed' is a value, not a section"):
        load_config("tiny", ["seed.x=1"], env={})


def test_malformed_override_and_unknown_profile() -> None:
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("tiny", ["data.max_documents"], env={})
    with pytest.raises(ConfigError, match=r"profile 'nope' not found.*tiny"):
        load_config("nope", env={})


def test_environment_overrides_sit_between_profile_and_cli() -> None:
    env = {"MEGACONTEXT_ARTIFACT_ROOT": "/tmp/x", "MEGACONTEXT_SEED": "5", "MEGACONTEXT_DATA_ROOT": "/tmp/d"}
    cfg = load_config("tiny", env=env)
    assert (cfg.paths.artifact_root, cfg.seed, str(cfg.paths.data_dir())) == ("/tmp/x", 5, "/tmp/d")
    assert load_config("tiny", ["seed=9"], env=env).seed == 9


def test_unknown_key_in_a_profile_file_names_the_file(tmp_path) -> None:
    profile = tmp_path / "mine.yaml"
    profile.write_text("data:\n  shard_max_token: 5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.shard_max_token' \(from .*mine\.yaml\)"):
        load_config(str(profile), env={})


def test_config_hash_ignores_paths_but_not_content() -> None:
    a = load_config("tiny", ["paths.artifact_root=/a"], env={})
    b = load_config("tiny", ["paths.artifact_root=/b"], env={})
    c = load_config("tiny", ["data.val_fraction=0.3"], env={})
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert config_hash(a, ["model"]) == config_hash(c, ["model"])
    gpu = load_config("tiny", ["model.device=cuda:1"], env={})  # where it runs is not what it is
    assert gpu.model.device == "cuda:1" and config_hash(gpu) == config_hash(a)
    slack = load_config("tiny", ["allocator.room_slack=480"], env={})  # the runtime's K/V schedule: no artifact reads it
    assert slack.allocator.room_slack == 480 and config_hash(slack) == config_hash(a)
    assert config_hash(load_config("tiny", ["allocator.refocus_every=64"], env={})) != config_hash(a)
    with pytest.raises(ConfigError, match="model.device"):
        load_config("tiny", ["model.device=gpu"], env={})


def test_resolved_config_round_trips_through_yaml(tmp_path) -> None:
    cfg = load_config("tiny", ["data.max_documents=2"], env={})
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path), env={}).model_dump(exclude={"profile"}) == cfg.model_dump(exclude={"profile"})


def test_a_partial_section_keeps_the_defaults_its_parent_declares() -> None:
    cfg = load_config("tiny", ["train.jt3.steps=7"], env={})
    assert cfg.train.jt3.steps == 7 and cfg.train.jt3.lr == 5e-4  # TrainConfig's default for jt3, not PhaseConfig's


def test_lensnet_attention_queries_must_be_raw_tail_tokens() -> None:
    from megacontext.config import load_config

    assert load_config("tiny", ["lensnet.wc_attention_queries=64"], env={}).lensnet.wc_attention_queries == 64
    with pytest.raises(Exception, match="wc_attention_queries"):
        load_config("tiny", ["lensnet.wc_attention_queries=65"], env={})
