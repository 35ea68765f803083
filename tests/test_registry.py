"""A stage from another installed package, registered under our entry-point group, can be named."""

from __future__ import annotations

from tests import custom_stages

OK = {"model": "openai/gpt-5.4", "messages": [{"role": "user", "content": "hi"}]}


async def test_third_party_entry_point_stage(gateway, tmp_path, monkeypatch):
    dist = tmp_path / "turnstile_stamp-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: turnstile-stamp\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[turnstile.stages]\nstamp = tests.custom_stages:Tag\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    custom_stages.ORDER.clear()
    client = await gateway(pipeline=[{"use": "stamp", "name": "third-party"}])
    resp = await client.post("/v1/chat/completions", json=OK)
    assert resp.status == 200
    assert resp.headers["X-Stage-third-party"] == "1"
    assert custom_stages.ORDER == ["in:third-party", "out:third-party"]
