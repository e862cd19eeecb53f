"""BabyAI demonstrations (image, mission, action) from minigrid's expert bot, and rollout evaluation.

A demonstration set is a pure function of (level, seed range): episode `seed` is the level's
environment reset with that seed and solved by `minigrid.utils.baby_ai_bot.BabyAIBot`. Sets are
cached on disk as safetensors (arrays) with the missions, the key and a SHA-256 of the arrays in
the header; a cache file is validated in full before use, and a bad one is refused (or rebuilt
when asked), never silently used. Train and evaluation seeds are disjoint ranges of the same level.

Episodes the bot does not solve are dropped (and counted): they give no expert path to imitate
or to measure SPL against.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "ktfed-babyai-demos/1"
NUM_ACTIONS = 7                       # minigrid Actions: left right forward pickup drop toggle done
GRID_VALUES = (11, 6, 3)              # value ranges of the image channels: object, colour, state
NUM_DIRECTIONS = 4
VIEW = 7                              # the agent's egocentric view is VIEW x VIEW cells
ARRAYS = {  # name -> (dtype, trailing shape); the leading dimension is samples or episodes
    "images": (np.uint8, (VIEW, VIEW, 3)), "directions": (np.int64, ()), "actions": (np.int64, ()),
    "mission_index": (np.int64, ()), "episode": (np.int64, ()),
    "episode_seeds": (np.int64, ()), "episode_lengths": (np.int64, ()),
}
PER_EPISODE = ("episode_seeds", "episode_lengths")


def default_cache_dir() -> Path:
    """$KTFED_CACHE_DIR/babyai, else ~/.cache/ktfed/babyai."""
    return Path(os.environ.get("KTFED_CACHE_DIR", Path.home() / ".cache" / "ktfed")).expanduser() / "babyai"


class BabyAIError(ValueError):
    """A bad level name or seed range."""


class DemoCacheError(ValueError):
    """A demonstration cache file that is missing parts, inconsistent or corrupted."""


def _quiet():
    # BabyAI's level generator prints every rejected sample ("Sampling rejected: ...")
    return contextlib.redirect_stdout(io.StringIO())


def babyai_levels() -> list[str]:
    import gymnasium as gym
    import minigrid  # noqa: F401 - registers the MiniGrid and BabyAI environments

    return sorted(name for name in gym.envs.registry if name.startswith("BabyAI-"))


def check_level(level: str) -> None:
    levels = babyai_levels()
    if level not in levels:
        close = [lv for lv in levels if level.lower().removeprefix("babyai-")[:6] in lv.lower()][:5]
        raise BabyAIError(f"unknown BabyAI level {level!r}"
                          + (f"; did you mean {', '.join(close)}?" if close else
                             f"; choose one of {len(levels)} registered levels, e.g. {', '.join(levels[:4])}"))


def make_env(level: str):
    import gymnasium as gym

    check_level(level)
    # the bare environment: the bot reads its internals, and checker wrappers only cost time here
    return gym.make(level, disable_env_checker=True).unwrapped


def missions(level: str, seeds: tuple[int, int]) -> list[str]:
    """The instruction of each seed in [start, stop) of `level`: what a rollout there is given
    (an environment reset each, ~0.3-6 ms; no bot run)."""
    start, stop = _check_range(level, seeds)
    env = make_env(level)
    with _quiet():
        return [env.reset(seed=s)[0]["mission"] for s in range(start, stop)]


# ---------------------------------------------------------------------------------------------
# demonstrations
# ---------------------------------------------------------------------------------------------

@dataclass
class Demos:
    """Single-step samples of expert episodes; sample i belongs to episode `episode[i]`."""

    level: str                      # a level name, or "+"-joined names for a concatenation
    seeds: tuple[int, int]          # [start, stop) the episodes were drawn from
    images: np.ndarray              # uint8 N x 7 x 7 x 3 (object, colour, state per cell)
    directions: np.ndarray          # int64 N: the agent's absolute facing direction 0..3
    actions: np.ndarray             # int64 N: the bot's action 0..6
    mission_index: np.ndarray       # int64 N: index into `missions`
    episode: np.ndarray             # int64 N: index into the per-episode arrays
    episode_seeds: np.ndarray       # int64 E
    episode_lengths: np.ndarray     # int64 E: the bot's path length (steps) on that seed
    missions: list[str]
    failed_seeds: int = 0           # seeds in the range the bot did not solve (not included)

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def num_episodes(self) -> int:
        return int(self.episode_seeds.shape[0])

    def mission_texts(self) -> list[str]:
        return [self.missions[i] for i in self.mission_index.tolist()]

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAYS}

    def subset_episodes(self, n: int) -> Demos:
        """The first n episodes (a smaller budget drawn from the same set)."""
        keep = self.episode < n
        return Demos(self.level, self.seeds, self.images[keep], self.directions[keep], self.actions[keep],
                     self.mission_index[keep], self.episode[keep], self.episode_seeds[:n],
                     self.episode_lengths[:n], self.missions, self.failed_seeds)

    @staticmethod
    def concat(parts: Sequence[Demos]) -> Demos:
        if not parts:
            raise BabyAIError("concat: no demonstration sets")
        where: dict[str, int] = {}          # mission -> its index in the union, in first-seen order
        cols = {name: [] for name in ARRAYS}
        offset = 0
        for d in parts:
            remap = np.array([where.setdefault(m, len(where)) for m in d.missions], dtype=np.int64)
            for name in ARRAYS:
                cols[name].append(getattr(d, name))
            cols["mission_index"][-1] = remap[d.mission_index] if len(d) else d.mission_index
            cols["episode"][-1] = d.episode + offset
            offset += d.num_episodes
        return Demos("+".join(d.level for d in parts), (min(d.seeds[0] for d in parts), max(d.seeds[1] for d in parts)),
                     *(np.concatenate(cols[name]) for name in ARRAYS), list(where),
                     sum(d.failed_seeds for d in parts))


def _check_range(level: str, seeds: tuple[int, int]) -> tuple[int, int]:
    check_level(level)
    start, stop = (int(s) for s in seeds)
    if not 0 <= start < stop:
        raise BabyAIError(f"seeds: need 0 <= start < stop, got [{start}, {stop})")
    return start, stop


def generate_demos(level: str, seeds: tuple[int, int], progress: Callable[[int], None] | None = None) -> Demos:
    """Run the bot on every seed of [start, stop); `progress(1)` after each episode."""
    from minigrid.utils.baby_ai_bot import BabyAIBot

    start, stop = _check_range(level, seeds)
    env = make_env(level)
    images, dirs, actions, mission_idx, episode = [], [], [], [], []
    ep_seeds, ep_lengths, where = [], [], {}     # where: mission -> index, in first-seen order
    failed = 0
    for seed in range(start, stop):
        steps: list[tuple] = []
        solved = False
        with _quiet():
            try:
                obs, _ = env.reset(seed=seed)
                bot = BabyAIBot(env)
                while True:
                    action = int(bot.replan())
                    steps.append((obs["image"], int(obs["direction"]), action))
                    obs, reward, terminated, truncated, _ = env.step(action)
                    if terminated or truncated:
                        solved = terminated and reward > 0
                        break
            except Exception:  # noqa: BLE001 - the bot gives up on rare layouts; that seed is skipped
                solved = False
        if progress is not None:
            progress(1)
        if not solved:
            failed += 1
            continue
        m = where.setdefault(env.mission, len(where))
        e = len(ep_seeds)
        for image, direction, action in steps:
            images.append(image)
            dirs.append(direction)
            actions.append(action)
            mission_idx.append(m)
            episode.append(e)
        ep_seeds.append(seed)
        ep_lengths.append(len(steps))
    env.close()
    as64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    img = np.stack(images).astype(np.uint8) if images else np.zeros((0, VIEW, VIEW, 3), np.uint8)
    return Demos(level, (start, stop), img, as64(dirs), as64(actions), as64(mission_idx), as64(episode),
                 as64(ep_seeds), as64(ep_lengths), list(where), failed)


# ---------------------------------------------------------------------------------------------
# the on-disk cache
# ---------------------------------------------------------------------------------------------

def cache_path(cache_dir: str | Path, level: str, seeds: tuple[int, int]) -> Path:
    return Path(cache_dir) / f"{level}_{int(seeds[0])}-{int(seeds[1])}.safetensors"


def _digest(arrays: dict[str, np.ndarray], missions: list[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    h.update(json.dumps(missions).encode())
    return h.hexdigest()


def save_demos(demos: Demos, path: str | Path) -> None:
    """Write-then-rename, so a crash never leaves a half-written file under the cache name."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in demos.arrays().items()}
    meta = {"format": FORMAT, "level": demos.level, "seed_start": str(demos.seeds[0]),
            "seed_stop": str(demos.seeds[1]), "failed_seeds": str(demos.failed_seeds),
            "missions": json.dumps(demos.missions), "sha256": _digest(arrays, demos.missions)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(arrays, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_demos(path: str | Path, level: str, seeds: tuple[int, int]) -> Demos:
    """Read a cache file and check everything: key, arrays, digest, value ranges, episode structure.
    Raises DemoCacheError naming the file and the first problem found."""
    from safetensors import safe_open

    path = Path(path)

    def bad(why: str) -> DemoCacheError:
        return DemoCacheError(f"demonstration cache {path}: {why} (delete it, or rebuild with on_corrupt='rebuild')")

    if not path.is_file():
        raise bad("file not found")
    if path.stat().st_size == 0:
        raise bad("empty file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types on bad bytes
        raise bad(f"not a readable safetensors file ({type(err).__name__}: {err})") from None
    if meta.get("format") != FORMAT:
        raise bad(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        key = (meta["level"], int(meta["seed_start"]), int(meta["seed_stop"]))
        missions = json.loads(meta["missions"])
        failed = int(meta["failed_seeds"])
        digest = meta["sha256"]
    except (KeyError, ValueError) as err:
        raise bad(f"header metadata incomplete or malformed ({err})") from None
    if key != (level, int(seeds[0]), int(seeds[1])):
        raise bad(f"holds {key[0]} seeds [{key[1]}, {key[2]}), expected {level} seeds [{seeds[0]}, {seeds[1]})")
    if set(arrays) != set(ARRAYS):
        raise bad(f"arrays {sorted(arrays)}, expected {sorted(ARRAYS)}")
    if not isinstance(missions, list) or not all(isinstance(m, str) for m in missions):
        raise bad("missions: not a list of strings")
    if _digest(arrays, missions) != digest:
        raise bad("SHA-256 of the contents does not match the one recorded in its header")
    n, e = arrays["actions"].shape[0], arrays["episode_seeds"].shape[0]
    for name, (dtype, trailing) in ARRAYS.items():
        a = arrays[name]
        want = ((e,) if name in PER_EPISODE else (n,)) + trailing
        if a.dtype != dtype or a.shape != want:
            raise bad(f"array {name}: {a.dtype} {a.shape}, expected {np.dtype(dtype)} {want}")
    if e == 0:
        raise bad("no episodes")
    img = arrays["images"]
    if any(int(img[..., c].max()) >= GRID_VALUES[c] for c in range(3)):
        raise bad("images: cell values out of range")
    checks = (("actions", NUM_ACTIONS), ("directions", NUM_DIRECTIONS), ("mission_index", len(missions)),
              ("episode", e))
    for name, hi in checks:
        a = arrays[name]
        if int(a.min()) < 0 or int(a.max()) >= hi:
            raise bad(f"{name}: values outside [0, {hi})")
    if not np.array_equal(np.bincount(arrays["episode"], minlength=e), arrays["episode_lengths"]):
        raise bad("episode_lengths do not match the samples of each episode")
    s = arrays["episode_seeds"]
    if int(s.min()) < key[1] or int(s.max()) >= key[2] or np.any(np.diff(s) <= 0):
        raise bad("episode_seeds: not increasing within the seed range")
    return Demos(level, (key[1], key[2]), *(arrays[name] for name in ARRAYS), missions, failed)


def get_demos(level: str, seeds: tuple[int, int], cache_dir: str | Path | None = None, *,
              on_corrupt: str = "raise", progress: Callable[[int], None] | None = None) -> Demos:
    """Demonstrations of `level` on seeds [start, stop), from the cache when it holds them.

    on_corrupt: "raise" (default) refuses a bad cache file with DemoCacheError; "rebuild"
    regenerates and overwrites it. No cache_dir: always generate, write nothing.
    """
    if on_corrupt not in ("raise", "rebuild"):
        raise ValueError(f"on_corrupt: must be 'raise' or 'rebuild', got {on_corrupt!r}")
    seeds = _check_range(level, seeds)
    if cache_dir is None:
        return generate_demos(level, seeds, progress)
    path = cache_path(cache_dir, level, seeds)
    if path.exists():
        try:
            return load_demos(path, level, seeds)
        except DemoCacheError:
            if on_corrupt == "raise":
                raise
    demos = generate_demos(level, seeds, progress)
    if demos.num_episodes == 0:
        raise BabyAIError(f"{level}: the bot solved none of seeds [{seeds[0]}, {seeds[1]})")
    save_demos(demos, path)
    return demos


# ---------------------------------------------------------------------------------------------
# rollouts: success rate and SPL against the bot's path length
# ---------------------------------------------------------------------------------------------

# policy(images N x 7 x 7 x 3 uint8, directions N, missions) -> actions N; with memory, the stacks
# of kt_core.vln.memory instead (images N x (1 + M) x 7 x 7 x 3, poses N x (1 + M) x 2)
Policy = Callable[[np.ndarray, np.ndarray, list[str]], np.ndarray]


@dataclass
class RolloutResult:
    level: str
    seeds: list[int]
    success: np.ndarray             # bool per episode
    steps: np.ndarray               # the policy's steps per episode
    bot_steps: np.ndarray           # the bot's path length on the same seed

    @property
    def success_rate(self) -> float:
        return float(self.success.mean())

    @property
    def spl(self) -> float:
        """Success weighted by (normalized inverse) path length, as in R2R: S * L / max(P, L)."""
        return float(np.mean(self.success * self.bot_steps / np.maximum(self.steps, self.bot_steps)))

    def summary(self) -> dict:
        return {"level": self.level, "episodes": len(self.seeds), "success_rate": self.success_rate,
                "spl": self.spl, "mean_steps": float(self.steps.mean()),
                "mean_bot_steps": float(self.bot_steps.mean())}


def rollout(policy: Policy, level: str, seeds: Sequence[int], bot_steps: Sequence[int], *,
            batch: int = 64, max_steps: int | None = None) -> RolloutResult:
    """Run `policy` on each seed, `batch` environments in lockstep (one policy call per step).

    A policy with a `memory` attribute > 0 (kt_core.vln.finetune.model_policy of a backbone with
    memory) is called with stacks of the current and its past frames (kt_core.vln.memory), kept
    per environment from the episode's start."""
    from kt_core.vln.memory import RolloutHistory

    if len(seeds) != len(bot_steps) or not len(seeds):
        raise BabyAIError("rollout: need one bot path length per seed, and at least one seed")
    envs = [make_env(level) for _ in range(min(batch, len(seeds)))]
    memory = int(getattr(policy, "memory", 0) or 0)
    history = RolloutHistory(len(envs), memory, NUM_ACTIONS, VIEW) if memory else None
    success = np.zeros(len(seeds), dtype=bool)
    steps = np.zeros(len(seeds), dtype=np.int64)
    for lo in range(0, len(seeds), len(envs)):
        wave = list(range(lo, min(lo + len(envs), len(seeds))))
        obs = {}
        with _quiet():
            for slot, i in enumerate(wave):
                obs[slot] = envs[slot].reset(seed=int(seeds[i]))[0]
                if history is not None:
                    history.reset(slot)
        limit = max_steps or envs[0].max_steps
        active = list(range(len(wave)))
        for _ in range(limit):
            if not active:
                break
            images = np.stack([obs[s]["image"] for s in active])
            directions = np.array([obs[s]["direction"] for s in active], dtype=np.int64)
            missions = [obs[s]["mission"] for s in active]
            if history is None:
                actions = policy(images, directions, missions)
            else:
                actions = policy(*history.stack(active, images, directions), missions)
            still = []
            for k, (slot, action) in enumerate(zip(active, np.asarray(actions).tolist())):
                i = wave[slot]
                if history is not None:
                    history.push(slot, images[k], int(directions[k]), int(action))
                obs[slot], reward, terminated, truncated, _ = envs[slot].step(int(action))
                steps[i] += 1
                if terminated or truncated:
                    success[i] = terminated and reward > 0
                else:
                    still.append(slot)
            active = still
    for env in envs:
        env.close()
    return RolloutResult(level, [int(s) for s in seeds], success, steps, np.asarray(bot_steps, dtype=np.int64))


def evaluate_policy(policy: Policy, level: str, seeds: tuple[int, int], cache_dir: str | Path | None = None,
                    batch: int = 64) -> RolloutResult:
    """Roll out on the seeds of [start, stop) that the bot solves, SPL against the bot's paths."""
    reference = get_demos(level, seeds, cache_dir)
    if reference.num_episodes == 0:
        raise BabyAIError(f"{level}: the bot solved none of seeds [{seeds[0]}, {seeds[1]})")
    return rollout(policy, level, reference.episode_seeds.tolist(), reference.episode_lengths.tolist(), batch=batch)
