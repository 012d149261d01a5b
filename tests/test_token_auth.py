"""An explicit --address to a cluster with Ray's token authentication (issue 17, item 14).

Ray 2.60 sends the local token by itself only for `address="auto"`; an explicit address
used to be refused after ~30 s of InvalidAuthToken retries, reported as "no cluster". Checked
by hand against a local `ray.init()` head (token auth on by default): the explicit address
now connects as `auto` does. Here: when the token is sent, and what the refusal says.
"""
from __future__ import annotations

import ray._private.authentication.authentication_token_setup as token_setup

from raysparse.cluster.preflight import send_token_like_auto, token_refused_hint


def test_an_explicit_address_sends_the_token_as_auto_does(monkeypatch):
    asked = []
    monkeypatch.setattr(token_setup, "maybe_enable_token_auth_if_token_available",
                        lambda warn_if_disabled=True: asked.append(warn_if_disabled) or True)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert send_token_like_auto("127.0.0.1:6379") is True and asked == [False]
    assert send_token_like_auto("auto") is False and send_token_like_auto(None) is False
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's explicit choice is kept
    assert send_token_like_auto("127.0.0.1:6379") is False and asked == [False]


def test_a_refusal_names_the_token_and_where_it_comes_from(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    sent = token_refused_hint("10.0.0.5:6379", sent_token=True)
    assert "refused this machine's Ray token" in sent and "ray get-auth-token" in sent
    unsent = token_refused_hint("10.0.0.5:6379", sent_token=False)
    assert "RAY_AUTH_MODE=token" in unsent and "ray get-auth-token" in unsent
    assert token_refused_hint("auto", sent_token=False) is None
