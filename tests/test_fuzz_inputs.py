"""Hostile input to the readers every peer or file reaches: the bounded JSON reader, the TOML
depth limit, the [federation] bounds of `ktfed config check`, countersignature tokens, and the
escaping of free text for one log line. Properties over generated input where natural."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from kt_core.bounded import (BoundedInputError, bracket_depth, check_toml_depth, depth_of, escape_field,
                             loads_json)
from kt_core.config import MAX_SEED, ConfigError, load_toml
from security.audit import AuditError
from security.audit.entry import parse_token

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(value=JSON_VALUES)
def test_bounded_json_reads_what_json_writes_within_the_limits(value):
    text = json.dumps(value)
    depth = depth_of(value)
    assert bracket_depth(text) == depth
    if depth <= 32:
        assert loads_json(text) == value
    else:
        with pytest.raises(BoundedInputError, match="levels deep"):
            loads_json(text)


@settings(max_examples=100, deadline=None)
@given(depth=st.integers(33, 100_000), opener=st.sampled_from(["[", '{"a":']))
def test_any_deep_nesting_is_refused_without_recursing(depth, opener):
    closer = "]" if opener == "[" else "}"
    text = opener * depth + ("1" if opener != "[" else "") + closer * depth
    with pytest.raises(BoundedInputError, match=f"nested {depth} levels deep"):
        loads_json(text)


@pytest.mark.parametrize("text, match", [("1" * 5000, "5000 digits"), ('{"a": -' + "9" * 21 + "}", "21 digits"),
                                         ("[NaN]", "NaN is not a JSON number"), ("Infinity", "Infinity")])
def test_huge_integers_and_non_numbers_are_refused(text, match):
    with pytest.raises(BoundedInputError, match=match):
        loads_json(text)


def test_brackets_inside_strings_do_not_count():
    assert loads_json(json.dumps({"a": "[" * 1000 + '\\"{{{'})) == {"a": "[" * 1000 + '\\"{{{'}
    check_toml_depth('x = "[[[[[[[[[[[[[[[[[[[[[[[[["\ny = \'{{{{{{{{{{{{{{{{{{{{\'\n# [[[[[[[[[[[[[[[[[[[[[[\n')


@pytest.mark.parametrize("token", [b"[" * 100_000, b'{"round":' + b"9" * 5000 + b"}",
                                   json.dumps({"format": "ktfed-audit-countersign/1", "round": 2**60}).encode()])
def test_hostile_countersignature_tokens_are_audit_errors(token):
    with pytest.raises(AuditError):
        parse_token(token)


def _token(**overrides) -> dict:
    token = {"format": "ktfed-audit-countersign/1", "run": "r", "round": 1, "signer": "site-a",
             "signer_certificate": "f" * 64, "signer_head": {"seq": 1, "hash": "a" * 64}, "subject": "coordinator",
             "subject_head": {"seq": 2, "hash": "b" * 64}, "time": "t", "signature": "s"}
    return {**token, **overrides}


@pytest.mark.parametrize("overrides", [{"round": 2**53}, {"round": -1},
                                       {"subject_head": {"seq": 2**53, "hash": "b" * 64}}])
def test_token_integers_beyond_what_the_log_can_store_are_refused_at_parse(overrides):
    parse_token(json.dumps(_token()).encode())
    with pytest.raises(AuditError, match="must be"):
        parse_token(json.dumps(_token(**overrides)).encode())


# ---------------------------------------------------------------- run configs

@pytest.mark.parametrize("line, field", [
    ("seed = -1", "federation.seed"), (f"seed = {MAX_SEED + 1}", "federation.seed"),
    ("seed = 9223372036854775807", "federation.seed"), ("round_timeout_s = inf", "federation.round_timeout_s"),
    ("round_timeout_s = nan", "federation.round_timeout_s"), ("gather_timeout_s = inf", "federation.gather_timeout_s"),
    ("gather_timeout_s = nan", "federation.gather_timeout_s"), ("server_lr = inf", "federation.server_lr"),
    ("server_lr = nan", "federation.server_lr")])
def test_federation_settings_that_would_break_the_run_are_refused(line, field):
    with pytest.raises(ConfigError, match=f"^<config>: {field}: must be"):
        load_toml(f"[federation]\n{line}\n")


def test_the_largest_seed_is_accepted():
    assert load_toml(f"[federation]\nseed = {MAX_SEED}\n").federation.seed == MAX_SEED


@pytest.mark.parametrize("text, match", [("a = " + "[" * 5000 + "]" * 5000, "nested 5000 levels deep"),
                                         ("a = " + "{b = " * 3000 + "1" + "}" * 3000, "nested 3000 levels deep"),
                                         ("k." * 5000 + "v = 1", "tables nested 5001 levels deep"),
                                         ("[" + "t." * 2000 + "u]\nv = 1", "tables nested 2002 levels deep")])
def test_deeply_nested_toml_is_refused_with_a_clear_error(text, match):
    with pytest.raises(ConfigError, match=match):
        load_toml(text)


def test_config_check_refuses_them_on_the_command_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation]\nround_timeout_s = nan\n")
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 10_000 + "]" * 10_000 + "\n")
    for path, text in ((bad, "federation.round_timeout_s: must be a finite number"),
                       (deep, "nested 10000 levels deep")):
        done = subprocess.run([sys.executable, "-m", "ktfed", "config", "check", str(path)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode != 0 and text in done.stdout + done.stderr, done.stdout + done.stderr
        assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- one log line per event

@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
def test_escaped_free_text_is_one_printable_line(text):
    out = escape_field(text)
    assert "\n" not in out and "\r" not in out and "\x1b" not in out
    assert not any(c in out for c in "\u2028\u2029\x85")
    assert len(out) <= 200 + len("... (99999 more characters)")


def test_escaping_keeps_ordinary_text_and_says_what_was_cut():
    assert escape_field("run finished") == "run finished"
    assert escape_field("a\nINFO forged") == "a\\x0aINFO forged"
    assert escape_field("x" * 250) == "x" * 200 + "... (50 more characters)"
