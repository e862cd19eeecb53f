"""The backbone's memory: past frames built the same way for training and rollouts, masked where
an episode has none, carried by distillation, and checked when a checkpoint is loaded."""
import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kt_core.config import VLNSettings
from kt_core.distill.nav import VLNMixable, build_nav_student, demo_dataset
from kt_core.distill.select import select_from_model, select_from_teacher
from kt_core.vln.adapt import AdapterConfig, adapt_backbone
from kt_core.vln.babyai import Demos, get_demos, rollout
from kt_core.vln.backbone import MAX_MEMORY, VLNBackbone, VLNConfig
from kt_core.vln.checkpoint import CheckpointError, load_backbone, save_backbone, sha256_file
from kt_core.vln.finetune import DemoTensors, encode_demos, inference_copy, model_policy
from kt_core.vln.memory import RolloutHistory, empty_action, episode_steps, stack_frames
from kt_core.vln.tokenizer import PAD_ID, Tokenizer

TOK = Tokenizer()
LEVEL = "BabyAI-GoToLocal-v0"


def frames(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, v, (n, 7, 7), generator=g) for v in (11, 6, 3)], dim=-1).to(torch.uint8)


def memory_batch(cfg, n=4, seed=0, first_steps=(0, 1, 2, 5)):
    """n samples of one long episode each, at positions `first_steps` (so 0..M past frames exist)."""
    length = max(first_steps) + 1
    images = frames(n * length, seed)
    g = torch.Generator().manual_seed(seed + 1)
    directions = torch.randint(0, 4, (n * length,), generator=g)
    actions = torch.randint(0, 7, (n * length,), generator=g)
    steps = torch.arange(length).repeat(n)
    idx = torch.tensor([e * length + first_steps[e % len(first_steps)] for e in range(n)])
    obs, pose = stack_frames(images, directions, actions, steps, idx, cfg.memory, cfg.num_actions)
    tokens = torch.from_numpy(TOK.encode_batch(["go to the red ball"] * n, 12))
    return tokens, obs, pose


# -- the stacks ---------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5), memory=st.integers(1, 4))
def test_stack_frames_reads_the_episode_back(lengths, memory):
    episode = np.repeat(np.arange(len(lengths)), lengths)
    steps = torch.from_numpy(episode_steps(episode))
    n = len(episode)
    images = frames(n)
    directions, actions = torch.arange(n) % 4, torch.arange(n) % 7
    obs, pose = stack_frames(images, directions, actions, steps, torch.arange(n), memory, 7)
    for i in range(n):
        assert torch.equal(obs[i, 0], images[i]) and pose[i, 0, 0] == directions[i]
        for j in range(1, memory + 1):
            if j <= int(steps[i]):         # the same episode, j steps back
                assert torch.equal(obs[i, j], images[i - j])
                assert tuple(pose[i, j].tolist()) == (int(directions[i - j]), int(actions[i - j]))
            else:                          # before the episode's start: empty, never another episode's
                assert not obs[i, j].any() and pose[i, j, 1] == empty_action(7)


def test_episode_steps_restart_at_every_episode():
    assert episode_steps(np.array([0, 0, 0, 1, 2, 2])).tolist() == [0, 1, 2, 0, 0, 1]
    assert episode_steps(np.array([], dtype=np.int64)).tolist() == []


def test_a_rollout_hands_the_policy_what_training_saw(tmp_path):
    """Replaying the bot's actions, the rollout's stacks equal DemoTensors' for every step."""
    demos = get_demos(LEVEL, (0, 3), tmp_path)
    data = encode_demos(demos, TOK, 12, memory=3)
    start = 0
    for e, length in enumerate(demos.episode_lengths.tolist()):
        expected = data.take(torch.arange(start, start + length))
        seen = []

        def replay(images, poses, missions, e=e, start=start):
            seen.append((images.copy(), poses.copy()))
            return np.array([demos.actions[start + len(seen) - 1]])

        replay.memory = 3
        result = rollout(replay, LEVEL, [int(demos.episode_seeds[e])], [length], batch=1)
        assert result.success_rate == 1.0 and len(seen) == length
        for k, (images, poses) in enumerate(seen):
            assert np.array_equal(images[0], expected[1][k].numpy())
            assert np.array_equal(poses[0], expected[2][k].numpy())
        start += length


def test_rollout_history_is_per_slot_and_reset():
    h = RolloutHistory(2, 2, 7)
    img = np.ones((7, 7, 3), np.uint8)
    h.push(0, img, 3, 2)
    obs, pose = h.stack([0, 1], np.zeros((2, 7, 7, 3), np.uint8), np.array([1, 2]))
    assert obs.shape == (2, 3, 7, 7, 3) and obs[0, 1].all() and not obs[1, 1:].any()
    assert pose[0].tolist() == [[1, 0], [3, 2], [0, 7]] and pose[1, 1:, 1].tolist() == [7, 7]
    h.reset(0)
    assert h.stack([0], np.zeros((1, 7, 7, 3), np.uint8), np.array([0]))[1][0, 1:, 1].tolist() == [7, 7]


def test_demo_tensors_need_steps_for_memory():
    with pytest.raises(ValueError, match="steps"):
        DemoTensors(torch.zeros(1, 3, dtype=torch.long), frames(1), torch.zeros(1, dtype=torch.long),
                    torch.zeros(1, dtype=torch.long), memory=2)


# -- the model ----------------------------------------------------------------------------------

def test_memory_zero_is_the_reactive_model():
    reactive = VLNBackbone(VLNConfig.tiny())
    assert not any("past_" in name for name in reactive.state_dict())
    with_memory = VLNBackbone(VLNConfig.tiny(memory=2))
    assert {n for n in with_memory.state_dict() if "past_" not in n} == set(reactive.state_dict())


def test_history_is_masked_where_the_episode_has_none_and_read_where_it_has():
    cfg = VLNConfig.tiny(memory=3)
    model = VLNBackbone(cfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():       # weights of a trained model's size, so that differences show
        for p in model.parameters():
            p.normal_(0, 0.3)
    tokens, obs, pose = memory_batch(cfg)
    base = model.act(tokens, obs, pose)
    # sample 0 is at its episode's first step: its (empty) past frames cannot matter
    changed = obs.clone()
    changed[0, 1:] = frames(3, seed=9)
    assert torch.allclose(model.act(tokens, changed, pose)[0], base[0], rtol=0, atol=1e-7)
    # sample 3 has 3 past frames: they do
    changed[3, 2] = frames(1, seed=10)[0]
    assert (model.act(tokens, changed, pose)[3] - base[3]).abs().max() > 1e-5
    acted = pose.clone()
    acted[3, 1, 1] = (acted[3, 1, 1] + 1) % 7
    assert (model.act(tokens, obs, acted)[3] - base[3]).abs().max() > 1e-5
    blind = VLNBackbone(VLNConfig.tiny(memory=3, memory_actions=False)).eval()
    assert torch.equal(blind.act(tokens, obs, acted), blind.act(tokens, obs, pose))


def test_a_memory_model_refuses_a_single_frame():
    model = VLNBackbone(VLNConfig.tiny(memory=2))
    tokens = torch.from_numpy(TOK.encode_batch(["open the door"], 12))
    with pytest.raises(ValueError, match="memory=2 needs B x 3 x 7 x 7 x 3 frames"):
        model.act(tokens, frames(1), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("bad, match", [
    (dict(memory=-1), "memory: must be an integer in 0..64"),
    (dict(memory=MAX_MEMORY + 1), "memory: must be an integer"),
    (dict(memory=True), "memory: must be an integer"),
    (dict(memory=2, vision="panorama"), "memory: past frames are built for the grid"),
    (dict(memory=2, memory_actions="yes"), "memory_actions: must be true or false"),
])
def test_memory_settings_are_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        VLNConfig.tiny(**bad).validate()


def test_run_config_memory_is_bounded():
    with pytest.raises(ValueError, match="memory: must be an integer between 0 and 64"):
        VLNSettings(memory=65).validate()
    VLNSettings(memory=4).validate()


def test_memory_model_learns_and_rolls_out(tmp_path):
    from kt_core.train import TrainConfig
    from kt_core.vln.finetune import evaluate, train_local

    demos = get_demos(LEVEL, (0, 4), tmp_path)
    tok = Tokenizer.from_texts(demos.missions)
    model = VLNBackbone(VLNConfig.tiny(vocab_size=len(tok), memory=2))
    data = encode_demos(demos, tok, 12, memory=2)
    before = evaluate(model, data)["loss"]
    train_local(model, data, TrainConfig(epochs=10**6, max_steps=30, lr=1e-2, batch_size=16, optimizer="adam"))
    assert evaluate(model, data)["loss"] < before
    policy = model_policy(model, tok)
    assert policy.memory == 2
    assert len(rollout(policy, LEVEL, [1_000_000, 1_000_001], [5, 5], max_steps=6).seeds) == 2


# -- checkpoints --------------------------------------------------------------------------------

def test_a_checkpoint_without_memory_is_refused_for_a_run_that_needs_it(tmp_path):
    path = tmp_path / "backbone.safetensors"
    save_backbone(VLNBackbone(VLNConfig.tiny()), TOK, path)
    with pytest.raises(CheckpointError, match="memory: the run needs a backbone with memory=4, .* memory=0 "
                                              "\\(no memory state\\)"):
        load_backbone(path, memory=4)
    with pytest.raises(CheckpointError, match="memory 0 in the checkpoint, 4 expected"):
        load_backbone(path, config=VLNConfig.tiny(memory=4))
    assert load_backbone(path, memory=0).config.memory == 0


def test_a_checkpoint_whose_memory_state_was_stripped_is_refused(tmp_path):
    from safetensors.torch import save_file

    model = VLNBackbone(VLNConfig.tiny(memory=2))
    state = {k: v for k, v in model.state_dict().items() if "past_" not in k}
    bad = tmp_path / "stripped.safetensors"
    save_file(state, str(bad), metadata={"format": "ktfed-vln-backbone/1", "config": model.cfg.to_json(),
                                         "tokenizer": TOK.to_json()})
    with pytest.raises(CheckpointError, match="memory: its header declares memory=2, but the memory state is missing"):
        load_backbone(bad, sha256=sha256_file(bad))


# -- distillation -------------------------------------------------------------------------------

def test_mixable_view_with_memory_equals_the_backbone(tmp_path):
    demos = get_demos(LEVEL, (0, 2), tmp_path)
    model = VLNBackbone(VLNConfig.tiny(memory=2)).eval()
    data = demo_dataset(demos, TOK, 12, memory=2)
    batch = {k: v[:8] for k, v in data.tensors.items()}
    expected = model.act(batch["tokens"], batch["images"], batch["directions"])
    assert torch.allclose(VLNMixable(model)(batch), expected, atol=1e-5)
    assert batch["images"].shape[1:] == (3, 7, 7, 3) and bool((batch["tokens"] == PAD_ID).any() or True)


def test_weight_selection_from_a_same_shape_teacher_copies_it():
    teacher = VLNBackbone(VLNConfig.tiny(memory=2, n_cross_layers=2)).eval()
    twin = VLNBackbone(VLNConfig.tiny(memory=2, n_cross_layers=2, seed=5)).eval()
    result = select_from_teacher(twin, teacher.state_dict())
    assert not result["kept"]
    tokens, obs, pose = memory_batch(teacher.cfg)
    assert torch.allclose(twin.act(tokens, obs, pose), teacher.act(tokens, obs, pose), atol=1e-6)


def test_weight_selection_slices_the_adapted_teacher():
    teacher = adapt_backbone(VLNBackbone(VLNConfig(memory=2)), AdapterConfig(adapter="waffle", n_factors=4))
    student = build_nav_student(teacher, d_model=48, init="random")
    random_start = copy.deepcopy(student.state_dict())
    result = select_from_model(student, teacher)
    folded = inference_copy(teacher).state_dict()
    last = teacher.cfg.n_cross_layers - 1
    assert torch.equal(student.tok_emb.weight, folded["tok_emb.weight"][:, :48])
    # the student's one cross-modal layer is the teacher's last, adapters folded in
    assert torch.equal(student.cross_layers[0].lang_block.ffn.fc.weight,
                       folded[f"cross_layers.{last}.lang_block.ffn.fc.weight"][:96, :48])
    # key and value are sliced apart, not as one block of rows
    kv = folded[f"cross_layers.{last}.vis_cross.key_value.weight"]
    d = teacher.cfg.d_model
    assert torch.equal(student.cross_layers[0].vis_cross.key_value.weight,
                       torch.cat([kv[:48, :48], kv[d:d + 48, :48]]))
    assert not result["kept"] and len(result["copied"]) == len(random_start)
    with pytest.raises(Exception, match="student_init"):
        build_nav_student(teacher, d_model=48, init="zeros")


def test_a_truncated_demo_set_keeps_its_episodes_apart(tmp_path):
    a = get_demos(LEVEL, (0, 2), tmp_path)
    b = get_demos("BabyAI-GoToObj-v0", (0, 2), tmp_path)
    joined = DemoTensors.concat([encode_demos(d, TOK, 12, memory=2) for d in (a, b)])
    first_of_b = len(a)
    _, obs, pose, _ = joined.take(torch.tensor([first_of_b]))
    assert pose[0, 1:, 1].tolist() == [7, 7] and not obs[0, 1:].any()
    assert isinstance(Demos.concat([a, b]), Demos)
