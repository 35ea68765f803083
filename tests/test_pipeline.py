"""Stages named in config run in the listed order, built with their options; bad rows fail at start-up."""

from __future__ import annotations

import pytest

from proxy.app import create_app
from proxy.config import ConfigError
from tests import custom_stages
from tests.conftest import make_config

OK = {"model": "openai/gpt-5.4", "messages": [{"role": "user", "content": "hi"}]}


async def test_custom_stages_run_in_config_order(gateway):
    custom_stages.ORDER.clear()
    client = await gateway(pipeline=[
        {"use": "tests.custom_stages:Tag", "name": "first"},
        {"use": "tests.custom_stages:Tag", "name": "second"},
    ])
    resp = await client.post("/v1/chat/completions", json=OK)
    assert resp.status == 200
    await resp.read()
    assert custom_stages.ORDER == ["in:first", "in:second", "out:second", "out:first"]
    assert resp.headers["X-Stage-first"] == resp.headers["X-Stage-second"] == "1"


async def test_stages_chain_whatever_their_parameter_names(gateway):
    custom_stages.ORDER.clear()
    client = await gateway(pipeline=[
        {"use": "tests.custom_stages:OtherNames", "name": "first"},
        {"use": "tests.custom_stages:Tag", "name": "second"},
        {"use": "tests.custom_stages:OtherNames", "name": "third"},
    ])
    resp = await client.post("/v1/chat/completions", json=OK)
    assert resp.status == 200
    await resp.read()
    assert custom_stages.ORDER == ["in:first", "in:second", "in:third", "out:third", "out:second", "out:first"]


def test_unknown_option_fails_at_start_up_naming_the_stage():
    cfg = make_config(pipeline=[{"use": "tests.custom_stages:Tag", "name": "a", "colour": "red"}])
    with pytest.raises(ConfigError, match=r"pipeline\[0\] \(tests.custom_stages:Tag\): unknown option 'colour'"):
        create_app(cfg, {})


def test_missing_option_fails_at_start_up():
    cfg = make_config(pipeline=[{"use": "tests.custom_stages:Tag"}])
    with pytest.raises(ConfigError, match=r"pipeline\[0\].*name"):
        create_app(cfg, {})


def test_unknown_stage_name_fails():
    cfg = make_config(pipeline=[{"use": "no-such-stage"}])
    with pytest.raises(ConfigError, match="no turnstile.stages named 'no-such-stage'"):
        create_app(cfg, {})


def test_bad_import_path_fails():
    cfg = make_config(pipeline=[{"use": "tests.nowhere:Nothing"}])
    with pytest.raises(ConfigError, match="cannot load"):
        create_app(cfg, {})
