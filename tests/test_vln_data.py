"""BabyAI demonstrations: generation, the on-disk cache and its validation, rollouts; the tokenizer."""
import json

import numpy as np
import pytest

from kt_core.vln.babyai import (BabyAIError, DemoCacheError, Demos, cache_path, evaluate_policy, get_demos,
                                load_demos, save_demos)
from kt_core.vln.tokenizer import (CLS_ID, MASK, PAD_ID, SEP_ID, SPECIALS, UNK_ID, Tokenizer, TokenizerError,
                                   split_words)

LEVEL = "BabyAI-GoToRedBallGrey-v0"


@pytest.fixture(scope="module")
def demos():
    return get_demos(LEVEL, (0, 6))


def test_demonstrations_are_image_mission_action_triplets(demos):
    assert demos.num_episodes == 6 and demos.failed_seeds == 0
    assert demos.images.shape == (len(demos), 7, 7, 3) and demos.images.dtype == np.uint8
    assert demos.missions == ["go to the red ball"]
    assert set(demos.actions.tolist()) <= set(range(7))
    assert np.array_equal(np.bincount(demos.episode), demos.episode_lengths)
    assert demos.episode_seeds.tolist() == list(range(6))


def test_generation_is_deterministic_and_silent(capsys, demos):
    again = get_demos(LEVEL, (0, 6))
    assert all(np.array_equal(a, b) for a, b in zip(demos.arrays().values(), again.arrays().values()))
    assert capsys.readouterr().out == ""


def test_cache_round_trip(tmp_path, demos):
    first = get_demos(LEVEL, (0, 6), tmp_path)
    assert cache_path(tmp_path, LEVEL, (0, 6)).is_file()
    second = load_demos(cache_path(tmp_path, LEVEL, (0, 6)), LEVEL, (0, 6))
    assert all(np.array_equal(a, b) for a, b in zip(first.arrays().values(), second.arrays().values()))
    assert second.missions == demos.missions


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_bytes(p.read_bytes()[:-40]), "not a readable safetensors file"),
    (lambda p: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"), "not a readable safetensors file"),
])
def test_corrupt_cache_is_refused_with_a_clear_error(tmp_path, damage, message):
    get_demos(LEVEL, (0, 4), tmp_path)
    path = cache_path(tmp_path, LEVEL, (0, 4))
    damage(path)
    with pytest.raises(DemoCacheError, match=message) as err:
        get_demos(LEVEL, (0, 4), tmp_path)
    assert str(path) in str(err.value)


def test_flipped_byte_in_the_data_is_caught_by_the_digest(tmp_path):
    get_demos(LEVEL, (0, 4), tmp_path)
    path = cache_path(tmp_path, LEVEL, (0, 4))
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF                        # inside the last array's payload
    path.write_bytes(bytes(raw))
    with pytest.raises(DemoCacheError, match="SHA-256"):
        get_demos(LEVEL, (0, 4), tmp_path)


def test_inconsistent_cache_contents_are_refused(tmp_path, demos):
    path = tmp_path / "x.safetensors"
    bad = Demos(**{**demos.__dict__, "actions": np.full_like(demos.actions, 9)})
    save_demos(bad, path)                  # a valid digest over invalid values
    with pytest.raises(DemoCacheError, match="actions: values outside"):
        load_demos(path, LEVEL, (0, 6))
    save_demos(demos, path)
    with pytest.raises(DemoCacheError, match="holds .* seeds \\[0, 6\\), expected .* seeds \\[0, 7\\)"):
        load_demos(path, LEVEL, (0, 7))


def test_corrupt_cache_is_rebuilt_when_asked(tmp_path, demos):
    get_demos(LEVEL, (0, 6), tmp_path)
    path = cache_path(tmp_path, LEVEL, (0, 6))
    path.write_bytes(b"garbage")
    rebuilt = get_demos(LEVEL, (0, 6), tmp_path, on_corrupt="rebuild")
    assert np.array_equal(rebuilt.actions, demos.actions)
    assert load_demos(path, LEVEL, (0, 6)).num_episodes == 6


def test_unknown_level_and_bad_seeds_are_refused():
    with pytest.raises(BabyAIError, match="unknown BabyAI level 'BabyAI-GoToRedBal-v0'.*did you mean"):
        get_demos("BabyAI-GoToRedBal-v0", (0, 2))
    with pytest.raises(BabyAIError, match="start < stop"):
        get_demos(LEVEL, (5, 5))


def test_concat_remaps_missions_and_episodes(demos):
    other = get_demos("BabyAI-GoToObj-v0", (0, 3))
    both = Demos.concat([demos, other])
    assert both.num_episodes == demos.num_episodes + other.num_episodes
    texts = both.mission_texts()
    assert texts[:len(demos)] == demos.mission_texts() and texts[len(demos):] == other.mission_texts()
    assert np.array_equal(np.bincount(both.episode), both.episode_lengths)


def test_rollouts_score_the_bot_replay_as_perfect(tmp_path):
    """Replaying the bot's own actions seed by seed gives SR = SPL = 1; a policy that only turns
    never succeeds."""
    ref = get_demos(LEVEL, (100, 104), tmp_path)
    per_seed = {int(s): ref.actions[ref.episode == e].tolist() for e, s in enumerate(ref.episode_seeds)}
    step = {s: 0 for s in per_seed}
    seeds = list(per_seed)

    def replay(images, directions, missions):
        # lockstep: every active episode asks once per step, in seed order
        out = []
        for s in [s for s in seeds if step[s] < len(per_seed[s])][:len(missions)]:
            out.append(per_seed[s][step[s]])
            step[s] += 1
        return np.array(out)

    r = evaluate_policy(replay, LEVEL, (100, 104), tmp_path)
    assert r.success_rate == 1.0 and r.spl == 1.0
    spin = evaluate_policy(lambda im, d, m: np.zeros(len(m), dtype=np.int64), LEVEL, (100, 104), tmp_path)
    assert spin.success_rate == 0.0 and spin.spl == 0.0 and spin.steps.min() == 64


# -- tokenizer --------------------------------------------------------------------------------

def test_tokenizer_encodes_babyai_missions():
    tok = Tokenizer()
    assert tok.vocab[:5] == list(SPECIALS) and len(tok) == 38
    ids = tok.encode("pick up the red ball, then go to a door", 16)
    assert ids[0] == CLS_ID and ids[12] == SEP_ID and ids[13:] == [PAD_ID] * 3
    assert UNK_ID not in ids
    assert tok.decode(ids) == "pick up the red ball , then go to a door"
    assert tok.encode("go to the zebra", 8)[4] == UNK_ID
    assert split_words("Go to the RED ball,then") == ["go", "to", "the", "red", "ball", ",", "then"]


def test_tokenizer_refuses_too_long_and_round_trips(tmp_path):
    tok = Tokenizer.from_texts(["walk past the sofa"])
    assert tok.vocab[-3:] == ["walk", "past", "sofa"]
    with pytest.raises(TokenizerError, match="more than max_len=4"):
        tok.encode("go to the red ball", 4)
    tok.save(tmp_path / "tok.json")
    assert Tokenizer.load(tmp_path / "tok.json").vocab == tok.vocab
    doc = json.loads(tok.to_json())
    doc["vocab"] = doc["vocab"][1:]
    with pytest.raises(TokenizerError, match="must start with"):
        Tokenizer.from_json(json.dumps(doc))
    assert MASK in tok.ids
