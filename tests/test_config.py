"""Contract tests for pipelines.config: precedence, errors that name key + source, paths, round trip."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from pipelines.config import (
    FLAG_ALIASES,
    AppConfig,
    ConfigError,
    add_config_arguments,
    config_digest,
    config_from_args,
    load_config,
    write_resolved_config,
)
from pipelines.config.cli import main

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def other_cwd(tmp_path, monkeypatch) -> Path:
    """A working directory unrelated to where the YAML lives."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# --------------------------------------------------------------------------- precedence


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == AppConfig()
    assert cfg.model.name_or_path == "Salesforce/blip-itm-base-coco"
    assert cfg.encode.batch_size == 16 and cfg.serve.port == 8000
    # built-in local paths are absolute: nothing depends on the working directory
    assert Path(cfg.source.uri).is_absolute() and Path(cfg.index.uri).is_absolute()


def test_precedence_flag_beats_override_beats_yaml_beats_default(tmp_path):
    cfg_file = _write(
        tmp_path / "c.yaml",
        """
        serve:
          port: 1111      # set in all four layers (default 8000)
          host: 10.0.0.1  # yaml + override
          k: 5            # yaml only
        """,
    )
    cfg = load_config(
        cfg_file,
        overrides=["serve.port=2222", "serve.host=10.0.0.2"],
        flags={"port": 3333, "host": None},  # None flags are ignored
    )
    assert cfg.serve.port == 3333
    assert cfg.serve.host == "10.0.0.2"
    assert cfg.serve.k == 5
    assert cfg.serve.candidates == 100  # default untouched


def test_later_override_wins_and_sections_merge(tmp_path):
    cfg_file = _write(tmp_path / "c.yaml", "encode: {batch_size: 4, num_actors: 3}\n")
    cfg = load_config(cfg_file, ["encode.batch_size=8", "encode.batch_size=9"])
    assert cfg.encode.batch_size == 9
    assert cfg.encode.num_actors == 3  # an override of one key keeps the file's siblings


def test_override_values_are_yaml_typed():
    cfg = load_config(
        None,
        [
            "encode.batch_size=8",
            "s3.allow_http=true",
            "ray.address=null",
            "ray.num_cpus=3",
            "encode.num_gpus_per_actor=0.5",
            "source.metadata_columns=[a, b]",
            "index.table=2024",  # a string field keeps the text YAML would make an int
        ],
    )
    assert cfg.encode.batch_size == 8
    assert cfg.s3.allow_http is True
    assert cfg.ray.address is None and cfg.ray.num_cpus == 3
    assert cfg.encode.num_gpus_per_actor == 0.5
    assert cfg.source.metadata_columns == ["a", "b"]
    assert cfg.index.table == "2024"


def test_argparse_glue(tmp_path):
    cfg_file = _write(tmp_path / "c.yaml", "serve: {port: 1111}\nencode: {batch_size: 4}\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ("index_uri", "port", "host"))
    args = parser.parse_intermixed_args(
        [
            "--config",
            str(cfg_file),
            "encode.batch_size=7",
            "--port",
            "4444",
            "--index-uri",
            "s3://b/x",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.serve.port == 4444 and cfg.encode.batch_size == 7
    assert cfg.index.uri == "s3://b/x"
    assert cfg.serve.host == "127.0.0.1"  # flag not given -> not applied
    with pytest.raises(ValueError, match="unknown config flag"):
        add_config_arguments(argparse.ArgumentParser(), ("batch_size",))


def test_flag_aliases_map_to_real_keys():
    values = {
        "source": "s3://a/b",
        "index_uri": "s3://c/d",
        "model": "org/m",
        "host": "h",
        "port": 1,
    }
    cfg = load_config(None, flags=values)
    for name, key in FLAG_ALIASES.items():
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == values[name]


# --------------------------------------------------------------------------- errors


def test_unknown_key_in_yaml_names_key_file_and_suggestion(tmp_path):
    cfg_file = _write(tmp_path / "configs" / "local.yaml", "encode:\n  batchsize: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file)
    msg = str(info.value)
    assert "'encode.batchsize'" in msg
    assert str(cfg_file) in msg
    assert "did you mean 'encode.batch_size'?" in msg
    assert info.value.key == "encode.batchsize"


def test_unknown_section_in_yaml(tmp_path):
    cfg_file = _write(tmp_path / "c.yaml", "encoder:\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'encoder' .*did you mean 'encode'"):
        load_config(cfg_file)


def test_unknown_override_key_names_the_override():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["encode.batchsize=8"])
    msg = str(info.value)
    assert "unknown key 'encode.batchsize'" in msg
    assert "command-line override 'encode.batchsize=8'" in msg
    assert "did you mean 'encode.batch_size'?" in msg


def test_credentials_are_rejected_with_a_hint(tmp_path):
    cfg_file = _write(tmp_path / "c.yaml", "s3:\n  secret_access_key: xyz\n")
    with pytest.raises(ConfigError, match=r"unknown key 's3.secret_access_key'.*AWS chain"):
        load_config(cfg_file)


def test_type_error_names_key_value_and_source(tmp_path):
    cfg_file = _write(tmp_path / "c.yaml", "encode:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file)
    msg = str(info.value)
    assert "'encode.batch_size'" in msg and "'lots'" in msg and str(cfg_file) in msg

    with pytest.raises(ConfigError) as info:
        load_config(cfg_file, ["encode.batch_size=0"])  # the override is at fault now
    msg = str(info.value)
    assert "'encode.batch_size'" in msg and "0" in msg
    assert "command-line override 'encode.batch_size=0'" in msg and str(cfg_file) not in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.device=gpu", "model.device"),
        ("model.dtype=fp8", "model.dtype"),
        ("s3.allow_http=1", "s3.allow_http"),  # strict: YAML already typed it, 1 is not a bool
        ("encode.num_actors=two", "encode.num_actors"),
    ],
)
def test_invalid_values(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_cross_field_check_names_section_and_source():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["serve.candidates=10"])
    msg = str(info.value)
    assert "'serve'" in msg and "serve.rerank_k (32)" in msg
    assert "command-line override 'serve.candidates=10'" in msg


def test_section_must_be_a_mapping(tmp_path):
    cfg_file = _write(tmp_path / "c.yaml", "encode: 8\n")
    with pytest.raises(ConfigError, match=r"'encode'.*c\.yaml.*mapping"):
        load_config(cfg_file)


def test_empty_sections_and_empty_file_are_fine(tmp_path):
    assert load_config(_write(tmp_path / "empty.yaml", "# nothing\n")) == AppConfig()
    assert load_config(_write(tmp_path / "s.yaml", "s3:\nray:\n")) == AppConfig()


def test_malformed_override():
    with pytest.raises(ConfigError, match="malformed.*'encode.batch_size'.*key=value"):
        load_config(None, ["encode.batch_size"])
    with pytest.raises(ConfigError, match="malformed"):
        load_config(None, ["=3"])


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found.*nope.yaml"):
        load_config(missing)


def test_yaml_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"list\.yaml.*mapping"):
        load_config(_write(tmp_path / "list.yaml", "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(_write(tmp_path / "bad.yaml", "model: [unclosed\n"))


def test_unknown_flag_name():
    with pytest.raises(ConfigError, match="unknown key 'colour'.*flag colour"):
        load_config(None, flags={"colour": "red"})


# --------------------------------------------------------------------------- paths


def test_yaml_paths_are_relative_to_the_yaml_dir(tmp_path, other_cwd):
    sub = tmp_path / "sub"
    (sub / "models" / "m").mkdir(parents=True)
    cfg_file = _write(
        sub / "c.yaml",
        """
        model: {name_or_path: models/m}     # no "./" but exists next to the file
        source: {uri: ../data/catalog}
        index: {uri: lancedb}
        output: {dir: ./out}
        """,
    )
    cfg = load_config(cfg_file)
    assert cfg.model.name_or_path == str(sub / "models" / "m")
    assert cfg.source.uri == str(tmp_path / "data" / "catalog")
    assert cfg.index.uri == str(sub / "lancedb")
    assert cfg.output.dir == str(sub / "out")
    assert Path.cwd() == other_cwd  # and none of them landed under the cwd


def test_relative_config_path_and_override_paths_use_the_cwd(tmp_path, other_cwd):
    _write(other_cwd / "cfgs" / "c.yaml", "index: {uri: idx}\n")
    cfg = load_config(
        "cfgs/c.yaml", ["source.uri=cat", "output.dir=../out"], flags={"model": "./mdl"}
    )
    assert cfg.index.uri == str(other_cwd / "cfgs" / "idx")  # from the file: the file's dir
    assert cfg.source.uri == str(other_cwd / "cat")  # from the command line: the cwd
    assert cfg.output.dir == str(tmp_path / "out")
    assert cfg.model.name_or_path == str(other_cwd / "mdl")


def test_hub_id_and_uris_untouched(tmp_path, other_cwd):
    cfg_file = _write(
        tmp_path / "c.yaml",
        """
        model: {name_or_path: Salesforce/blip-itm-large-coco}
        source: {uri: "s3://catalog/products/"}
        index: {uri: "s3://search/lancedb"}
        output: {dir: "gs://bucket/out"}
        """,
    )
    cfg = load_config(cfg_file, ["model.name_or_path=Salesforce/blip-itm-base-flickr"])
    assert cfg.model.name_or_path == "Salesforce/blip-itm-base-flickr"
    assert cfg.source.uri == "s3://catalog/products/"
    assert cfg.index.uri == "s3://search/lancedb"
    assert cfg.output.dir == "gs://bucket/out"
    assert load_config(cfg_file).model.name_or_path == "Salesforce/blip-itm-large-coco"


def test_home_paths_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["index.uri=~/idx", "model.name_or_path=~/m"])
    assert cfg.index.uri == str(tmp_path / "idx")
    assert cfg.model.name_or_path == str(tmp_path / "m")


# --------------------------------------------------------------------------- output


def test_write_resolved_config_round_trip(tmp_path, other_cwd):
    cfg_file = _write(
        tmp_path / "sub" / "c.yaml",
        """
        model: {name_or_path: ../models/tiny, dtype: float32}
        source: {uri: cat, columns: {title: name}}
        index: {uri: "s3://b/lancedb"}
        output: {dir: out}
        s3: {region: eu-west-1}
        """,
    )
    cfg = load_config(cfg_file, ["encode.batch_size=3", "ray.num_cpus=2"])
    written = write_resolved_config(cfg, tmp_path / "run" / "outputs")
    assert written == tmp_path / "run" / "outputs" / "config.resolved.yaml"
    data = yaml.safe_load(written.read_text())
    assert data["source"]["uri"] == str(tmp_path / "sub" / "cat")  # absolute in the file
    assert data["model"]["name_or_path"] == str(tmp_path / "models" / "tiny")
    again = load_config(written)
    assert again == cfg
    assert config_digest(again) == config_digest(cfg)
    with pytest.raises(ValueError, match="local directories"):
        write_resolved_config(cfg, "s3://b/out")


def test_config_digest_tracks_values():
    base = load_config(None)
    assert config_digest(base) == config_digest(load_config(None))
    assert len(config_digest(base)) == 16 and int(config_digest(base), 16) >= 0
    assert config_digest(load_config(None, ["encode.batch_size=17"])) != config_digest(base)
    assert config_digest(
        load_config(None, ["source.metadata_columns=[category]"])
    ) != config_digest(base)


# --------------------------------------------------------------------------- shipped configs


def test_local_yaml_documented_values(other_cwd):
    cfg = load_config(REPO / "configs" / "local.yaml")
    data = REPO / ".data"
    assert cfg.source.uri == str(data / "catalog" / "products")
    assert cfg.index.uri == str(data / "lancedb")
    assert cfg.output.dir == str(data / "out")
    assert cfg.model.name_or_path == str(data / "models" / "tiny")
    assert (cfg.model.device, cfg.model.dtype) == ("cpu", "auto")
    assert cfg.ray.address is None and cfg.ray.num_cpus == 2
    assert (cfg.encode.batch_size, cfg.encode.num_actors) == (16, 1)
    assert cfg.encode.num_cpus_per_actor == 1 and cfg.encode.num_gpus_per_actor == 0
    assert cfg.encode.num_cpus_per_actor < cfg.ray.num_cpus  # leaves Ray Data a CPU
    assert cfg.serve.host == "127.0.0.1"


def test_prod_yaml_documented_values():
    cfg = load_config(REPO / "configs" / "prod.yaml")
    assert cfg.source.uri == "s3://catalog-prod/products/"
    assert cfg.index.uri == "s3://search-prod/lancedb"
    assert cfg.model.name_or_path == "Salesforce/blip-itm-base-coco"
    assert (cfg.model.device, cfg.model.dtype) == ("cuda", "bfloat16")
    assert (cfg.encode.batch_size, cfg.encode.num_actors) == (256, 4)
    assert (cfg.encode.num_gpus_per_actor, cfg.encode.num_cpus_per_actor) == (1, 4)
    assert cfg.s3.region == "us-east-1" and cfg.s3.endpoint_url is None
    assert cfg.ray.address == "auto"


@pytest.mark.parametrize("name", ["local.yaml", "prod.yaml"])
def test_shipped_configs_hold_no_credentials(name):
    text = (REPO / "configs" / name).read_text().lower()
    for word in ("access_key", "secret", "aws_session_token", "password"):
        assert word not in text


# --------------------------------------------------------------------------- CLI


def test_cli_prints_resolved_yaml(capsys, other_cwd):
    assert (
        main(
            ["--config", str(REPO / "configs" / "local.yaml"), "encode.batch_size=8", "--port", "9"]
        )
        == 0
    )
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["encode"]["batch_size"] == 8 and data["serve"]["port"] == 9


def test_cli_exits_2_with_one_line_message_on_unknown_key(tmp_path):
    cfg_file = _write(tmp_path / "c.yaml", "serve:\n  prot: 80\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.config", "--config", str(cfg_file)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no traceback
    assert "'serve.prot'" in lines[0] and str(cfg_file) in lines[0] and "serve.port" in lines[0]


def test_the_service_replicas_get_the_serving_sections_only():
    """``ServingConfig``: the sections a Serve replica reads, shared with the full config; a full
    config dump is refused, so a replica never carries the job and tool sections."""
    import pydantic

    from pipelines.config import ServingConfig, serving_config

    cfg = load_config(str(REPO / "configs" / "demo.yaml"))
    serving = serving_config(cfg)
    assert set(serving.model_dump()) == {"model", "index", "s3", "serve"}
    assert serving.serve is cfg.serve and serving.index is cfg.index
    assert ServingConfig.model_validate(serving.model_dump(mode="python")) == serving
    assert serving_config(serving) is serving
    with pytest.raises(pydantic.ValidationError, match="finetune"):
        ServingConfig.model_validate(cfg.model_dump(mode="python"))
