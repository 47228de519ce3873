"""YAML run configs: validated into the dataclasses, bad keys and types named, overrides applied."""
import pytest
import yaml

from eenn.config import ConfigError, RunConfig, apply_overrides, config_to_dict, load_config, save_config


def _write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_round_trip_and_overrides(tmp_path):
    p = _write(tmp_path, """
data: {name: fashion_mnist, limit: 2000}
model: {backbone: resnet20, exits: linear:3, backbone_options: {width: 0.5}}
objective: {name: joint, options: {weights: sdn}}
train: {epochs: 4, lr: 0.1}
eval: {policy: entropy, goal: {budget: 1.0e6}}
""")
    cfg = load_config(p, ["train.epochs=2", "model.backbone_options.width=0.25", "eval.batch_sizes=[1, 64]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.data.name == "fashion_mnist" and cfg.data.limit == 2000 and cfg.data.val_fraction == 0.1
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.1 and cfg.train.momentum == 0.9
    assert cfg.model.backbone_options == {"width": 0.25} and cfg.model.exits == "linear:3"
    assert cfg.eval.goal == {"budget": 1e6} and cfg.eval.batch_sizes == [1, 64]
    assert isinstance(cfg.train.lr, float)
    again = load_config(save_config(cfg, tmp_path / "resolved.yaml"))
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize("text, message", [
    ("train: {epoch: 3}", "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("trian: {epochs: 3}", "unknown key 'trian' (did you mean 'train'?)"),
    ("train: {epochs: three}", "train.epochs: expected int, got str 'three'"),
    ("train: {epochs: true}", "train.epochs: expected int"),
    ("data: {limit: 1.5}", "data.limit: expected int or NoneType"),
    ("model: [resnet20]", "model: expected a mapping"),
    ("- a\n- b", "the top level must be a mapping"),
    ("train: {epochs: [1,", "not valid YAML at line"),
])
def test_bad_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    assert message in str(e.value) and str(tmp_path) in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("data: {val_fraction: 0}", "data.val_fraction: 0 must lie in (0, 1)"),
    ("eval: {goal: {maxdrop: 0.01}}", "eval.goal {'maxdrop': 0.01}"),
    ("eval: {policy: ensemble}", "eval.policy 'ensemble' needs eval.policy_options.weights"),
    ("eval: {policy: max_prob, policy_options: {bogus: 1}}", "does not accept option(s) 'bogus'"),
    ("eval: {policy: nope}", "eval.policy 'nope'"),
    ("eval: {batch_sizes: [1], timing_samples: [256, 2048]}", "eval.timing_samples [256, 2048]: give one count"),
    ("eval: {batch_sizes: [0, 4]}", "eval.batch_sizes: expected a list of whole numbers >= 1"),
    ("train: {grad_clip: -1}", "train: grad_clip must be > 0"),
    ("train: {early_stopping: 0}", "train: early_stopping must be >= 1"),
    ("train: {gamma: -1}", "train: gamma must be > 0"),
    ("train: {seed: -1}", "train: seed must be in [0, 2**32 - 1]"),
    ("train: {lr: .nan}", "train: lr must be > 0, got nan"),
    ("train: {device: gpu}", "train: device 'gpu' is not a device"),
    ("objective: {name: heads_only}", "give the trained network's weights (objective.options.checkpoint"),
    ("objective: {name: joint, options: {wieghts: sdn}}", "objective: objective 'joint' does not accept option(s) 'wieghts'"),
    ("objective: {name: jiont}", "objective: unknown objective 'jiont'"),
    ("model: {backbone: resnet21}", "model: unknown backbone 'resnet21'"),
    ("model: {backbone: mlp, backbone_options: {width: abc}}", "model: backbone 'mlp': option 'width' must be"),
    ("model: {head: lineer}", "model: unknown exit head 'lineer'"),
])
def test_values_a_run_cannot_use_are_refused_before_it_starts(tmp_path, text, message):
    """Settings of the right type that would fail a run (often only after training, at the
    report) or train it wrongly (a negative clip norm reverses the gradient) are refused when the
    config is read, naming the key."""
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    assert message in str(e.value), str(e.value)


def test_bad_overrides_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_run_stored_by_an_earlier_eenn_opens_with_its_removed_settings_ignored(tmp_path):
    """A run directory whose config.yaml names a setting this eenn no longer has (eval.optimize
    was replaced by eval.deployments) still opens for reporting, with a warning naming the key;
    a config a user writes is still refused on the same key."""
    import torch

    import eenn
    from eenn.config import config_from_dict
    from eenn.run import open_run

    cfg = config_to_dict(RunConfig())
    cfg["eval"]["optimize"] = False
    dropped = []
    assert config_to_dict(config_from_dict(cfg, dropped=dropped)) == config_to_dict(RunConfig())
    assert dropped == ["eval.optimize"]
    with pytest.raises(ConfigError, match="unknown key 'eval.optimize'"):
        config_from_dict(cfg)
    torch.manual_seed(0)
    eenn.save(eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits="linear:2"),
              tmp_path / "best.safetensors")
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.warns(UserWarning, match=r"no longer has \(eval\.optimize\); they are ignored"):
        net, config, run_dir = open_run(tmp_path)
    assert config is not None and run_dir == tmp_path and net.num_exits == 3


def test_written_yaml_spells_shared_values_out():
    """A list two keys share is written out at both (no ``&id001`` / ``*id001`` for a person to
    decode), and reads back equal."""
    from eenn.io import _loader, dump_yaml

    shared = [16, 32]
    text = dump_yaml({"a": {"widths": shared}, "b": {"widths": shared}, "z": 1})
    assert "&" not in text and "*" not in text and text.index("a:") < text.index("z:")
    assert yaml.load(text, Loader=_loader()) == {"a": {"widths": [16, 32]}, "b": {"widths": [16, 32]}, "z": 1}
