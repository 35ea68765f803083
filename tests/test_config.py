"""Configuration: defaults, overrides, and errors that name the bad key; `turnstile check-config`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy import config
from proxy.cli import main
from proxy.config import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "turnstile.example.toml"


def test_defaults_need_no_file():
    cfg = config.load(None)
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8787)
    assert cfg.server.max_body_bytes == 4 * 1024 * 1024
    assert cfg.limits.storage == "memory://"
    assert [p.name for p in cfg.providers][-1] == "openrouter"


def test_file_overrides_merge(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[server]\nport = 9000\n[[providers]]\nname = "openrouter"\nbase_url = "http://mirror/v1"\n'
                 '[[providers]]\nname = "ollama"\nbase_url = "http://127.0.0.1:11434/v1"\nmodels = ["ollama/*"]\nstrip_prefix = true\n')
    cfg = config.load(f)
    assert cfg.server.port == 9000 and cfg.server.host == "127.0.0.1"
    by_name = {p.name: p for p in cfg.providers}
    assert by_name["openrouter"].base_url == "http://mirror/v1"
    assert by_name["openrouter"].api_key_env == "OPENROUTER_API_KEY"
    assert cfg.providers[0].name == "ollama"  # an operator's own provider is preferred


@pytest.mark.parametrize("text, named", [
    ("[server]\nprot = 1\n", "server.prot: unknown key"),
    ("[server]\nport = \"80\"\n", "server.port: expected int"),
    ("[serverr]\n", "serverr: unknown key"),
    ("[[providers]]\nname = \"x\"\n", "providers[0]: missing required key 'base_url'"),
    ("[[providers]]\nname = \"x\"\nbase_url = \"u\"\napi_key = \"sk-secret\"\n", "providers[0].api_key: unknown key"),
    ("[[pipeline]]\nopt = 1\n", "pipeline[0].use"),
    ("[[models]]\nname = \"x\"\n", "models[0].id"),
    ("[server]\nport = [\n", "not valid TOML"),
    ("[server]\nbody_timeout = 0.0\n", "server.body_timeout: must be more than 0"),
])
def test_errors_name_the_key(tmp_path, text, named):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        config.load(f)


def test_check_config_refuses_a_key_database_that_cannot_be_opened(tmp_path, capsys, monkeypatch):
    """Before: "OK", then `serve` and `keys` died with a sqlite3 traceback that did not name the path."""
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no-such-dir" / "keys.db"
    conf = tmp_path / "t.toml"
    conf.write_text(f'[keys]\ndb = "{missing}"\n')
    assert main(["check-config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "does not exist" in err
    assert main(["keys", "--config", str(conf), "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "Traceback" not in err
    assert main(["serve", "--config", str(conf), "--port", "0"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not missing.parent.exists()


def test_key_database_and_its_wal_files_are_private(tmp_path):
    from proxy.store import create_key
    from proxy.store.sqlite import connect

    path = str(tmp_path / "keys.db")
    db = connect(path)
    create_key(path, "alice", "1")
    for name in (path, path + "-wal", path + "-shm"):
        assert os.stat(name).st_mode & 0o777 == 0o600, name
    db.close()
    os.chmod(path, 0o644)  # made before this change: tightened when next opened
    connect(path).close()
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_check_config_cli(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[upstream]\nread_timout = 5\n")
    assert main(["check-config", str(bad)]) == 2
    assert "upstream.read_timout: unknown key" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text("[server]\nport = 9001\n")
    assert main(["check-config", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["check-config", str(tmp_path / "missing.toml")]) == 2


def test_annotated_example_is_valid(capsys):
    assert main(["check-config", str(EXAMPLE)]) == 0


def test_serve_checks_the_port_and_workers_given_on_the_command_line(capsys):
    assert main(["serve", "--port", "70000"]) == 2
    assert "server.port: must be between 0 and 65535" in capsys.readouterr().err
    assert main(["serve", "--workers", "0"]) == 2
    assert "server.workers: must be at least 1" in capsys.readouterr().err


def test_keys_and_usage_read_the_config_serve_reads(tmp_path, capsys, monkeypatch):
    """Before: `serve` took TURNSTILE_CONFIG, `keys` and `usage` did not, and wrote to another database."""
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "t.toml"
    conf.write_text(f'[keys]\ndb = "{tmp_path / "shared.db"}"\n')
    monkeypatch.setenv("TURNSTILE_CONFIG", str(conf))
    assert main(["keys", "create", "--name", "alice"]) == 0
    assert main(["usage"]) == 0
    assert (tmp_path / "shared.db").exists() and not (tmp_path / "turnstile-keys.db").exists()
