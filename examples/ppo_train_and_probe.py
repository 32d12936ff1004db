"""Train the seed's PPO agent and probe every actor and critic layer, before and after training.

This is the main demo (`make demo`). It builds exactly the agent of the seed notebook
(`examples/torchrl_ppo_action_probing.py`): InvertedDoublePendulum-v4 through TorchRL's `GymEnv` with
`DoubleToFloat` and `StepCounter`, a 6×32 tanh MLP actor with a `TanhNormal` head, a 6×32 critic, GAE and
`ClipPPOLoss`. Then it

1. evaluates the untrained agent (mean return of a few deterministic episodes);
2. collects a probing dataset with the current policy and fits one linear probe per layer on the action,
   with the seed's protocol (80/20 random split, `LinearRegression`, `r2_score`, `relative=False` names);
3. trains the agent with a standard TorchRL PPO loop (a single-process `Collector`, a replay buffer sampled
   without replacement, several epochs per batch, Adam, gradient clipping);
4. evaluates and probes again, prints a per-layer table, and writes `ppo_probing.png` and
   `ppo_probing.json` to `--out`.

Run it with::

    python examples/ppo_train_and_probe.py                # defaults: a few minutes on 2 CPU cores
    python examples/ppo_train_and_probe.py --frames 2000  # smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.data import LazyTensorStorage, ReplayBuffer
from torchrl.data.replay_buffers.samplers import SamplerWithoutReplacement
from torchrl.envs import Compose, DoubleToFloat, EnvBase, ExplorationType, StepCounter, TransformedEnv
from torchrl.envs.libs.gym import GymEnv
from torchrl.envs.utils import set_exploration_type
from torchrl.modules import MLP, NormalParamExtractor, ProbabilisticActor, TanhNormal
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE
from tqdm import tqdm

from tdhook.latent.probing import ProbeManager, Probing

# torchrl logs INFO lines with raw terminal colour codes (e.g. when a replay buffer allocates its
# storage); they interleave with the progress bar and say nothing a demo user needs.
logging.getLogger("torchrl").setLevel(logging.WARNING)

try:  # torchrl >= 0.12 names the single-process collector `Collector` (`SyncDataCollector` is deprecated)
    from torchrl.collectors import Collector
except ImportError:  # pragma: no cover - older torchrl
    from torchrl.collectors import SyncDataCollector as Collector

ENV_NAME = "InvertedDoublePendulum-v4"
HIDDEN_SIZE = 32
NUM_CELLS = 6

# The seed's layer selection: every module inside the actor's and the critic's MLP, by absolute name.
LAYER_PATTERN = r"td_module.(critic_network.module.\d+|actor_network.module.0.module.0.\d+)"
ACTOR_PREFIX = "td_module.actor_network.module.0.module.0."
CRITIC_PREFIX = "td_module.critic_network.module."
# Short names for the table and the plot; the legend gives the full names once.
SHORT_PREFIXES = {ACTOR_PREFIX: "actor.", CRITIC_PREFIX: "critic."}
LEGEND = (
    f"actor.i = {ACTOR_PREFIX}i, critic.i = {CRITIC_PREFIX}i (metric names end in _fwd); "
    "even i: Linear, odd i: Tanh.\n"
    "A Tanh layer and the Linear after it share an R²: that Linear (32 -> 32) is an invertible affine map "
    "of the Tanh's output, and a linear probe with an intercept reads exactly the same information "
    "through it. Layer 0 likewise matches a probe on the 11 observations themselves."
)

# TensorDict keys read from the collected batches and written for the probes (declared once).
OBSERVATION_KEY = "observation"
ACTION_KEY = "action"
LABELS_KEY = "labels"
STEP_TYPE_KEY = "step_type"
REWARD_KEY = ("next", "reward")
DONE_KEY = ("next", "done")
NEXT_STEP_COUNT_KEY = ("next", "step_count")
LOSS_KEYS = ("loss_objective", "loss_critic", "loss_entropy")

TRAIN_FRACTION = 0.8
PLOT_NAME = "ppo_probing.png"
JSON_NAME = "ppo_probing.json"


@dataclass(frozen=True)
class Agent:
    """The seed's networks, wired into a PPO loss and an advantage module."""

    actor: ProbabilisticActor
    critic: TensorDictModule
    advantage: GAE
    loss: ClipPPOLoss


def make_env(seed: int, device: torch.device) -> TransformedEnv:
    """Build the seed's environment: InvertedDoublePendulum-v4, `DoubleToFloat`, `StepCounter`."""
    env = TransformedEnv(GymEnv(ENV_NAME, device=device), Compose(DoubleToFloat(), StepCounter()))
    env.set_seed(seed)
    return env


def make_agent(env: EnvBase, device: torch.device) -> Agent:
    """Build the seed's actor, critic, GAE and `ClipPPOLoss`, with the seed's hyperparameters."""
    n_obs = env.observation_spec[OBSERVATION_KEY].shape[-1]
    n_act = env.action_spec.shape[-1]
    actor_module = TensorDictModule(
        nn.Sequential(
            MLP(in_features=n_obs, out_features=2 * n_act, num_cells=[HIDDEN_SIZE] * NUM_CELLS),
            NormalParamExtractor(),
        ),
        in_keys=[OBSERVATION_KEY],
        out_keys=["loc", "scale"],
    )
    actor = ProbabilisticActor(
        module=actor_module,
        spec=env.action_spec,
        in_keys=["loc", "scale"],
        distribution_class=TanhNormal,
        distribution_kwargs={"low": env.action_spec.space.low, "high": env.action_spec.space.high},
        return_log_prob=True,
    ).to(device)
    critic = TensorDictModule(
        MLP(in_features=n_obs, out_features=1, num_cells=[HIDDEN_SIZE] * NUM_CELLS),
        in_keys=[OBSERVATION_KEY],
        out_keys=["state_value"],
    ).to(device)
    advantage = GAE(
        gamma=0.99, lmbda=0.95, value_network=critic, average_gae=True, device=device, deactivate_vmap=True
    )
    loss = ClipPPOLoss(
        actor_network=actor,
        critic_network=critic,
        clip_epsilon=0.2,
        entropy_bonus=True,
        entropy_coeff=1e-4,
        critic_coeff=1.0,
        loss_critic_type="smooth_l1",
        functional=False,
    )
    return Agent(actor=actor, critic=critic, advantage=advantage, loss=loss)


def evaluate(env: EnvBase, actor: nn.Module, *, episodes: int, max_steps: int) -> float:
    """Mean undiscounted return of `episodes` deterministic episodes (actions at the policy's mode)."""
    returns = []
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        for _ in range(episodes):
            rollout = env.rollout(max_steps, actor, break_when_any_done=True)
            returns.append(rollout[REWARD_KEY].sum().item())
    return sum(returns) / len(returns)


def collect(env: EnvBase, agent: Agent, frames: int, device: torch.device) -> TensorDictBase:
    """Collect `frames` transitions with the current (stochastic) policy and add GAE targets."""
    collector = Collector(env, agent.actor, frames_per_batch=frames, total_frames=frames, device=device)
    batch = next(iter(collector))
    collector.shutdown(close_env=False)
    with torch.no_grad():
        agent.advantage(batch)
    return batch


def probe(agent: Agent, batch: TensorDictBase, generator: torch.Generator) -> dict[str, dict[str, float]]:
    """Probe every actor and critic layer for the action, with the seed's protocol.

    Activations are flattened as in the seed, then cast to float64: saturated tanh layers of a
    trained network are badly conditioned, and scikit-learn solving the least squares in float32
    produced impossible negative *training* R² (e.g. -1.5 on the critic's last hidden layer).

    Returns:
        ``{"fit": {layer: r2}, "predict": {layer: r2}}`` keyed by the produced metric names
        (``td_module...._fwd``).
    """
    indices = torch.randperm(batch.numel(), generator=generator)
    split = int(TRAIN_FRACTION * batch.numel())
    train_batch, test_batch = batch[indices[:split]], batch[indices[split:]]
    manager = ProbeManager(
        LinearRegression,
        {},
        lambda preds, labels: {"r2": r2_score(labels, preds)},
        data_preprocess_callback=lambda data: data.detach().flatten(1).double(),
    )
    with (
        torch.no_grad(),
        Probing(
            LAYER_PATTERN,
            manager.probe_factory,
            additional_keys=[LABELS_KEY, STEP_TYPE_KEY],
            relative=False,
        ).prepare(agent.loss) as hooked,
    ):
        train_batch[LABELS_KEY] = train_batch[ACTION_KEY]
        train_batch[STEP_TYPE_KEY] = "fit"
        hooked(train_batch)
        test_batch[LABELS_KEY] = test_batch[ACTION_KEY]
        test_batch[STEP_TYPE_KEY] = "predict"
        hooked(test_batch)
    return {
        "fit": {k: float(v["r2"]) for k, v in manager.fit_metrics.items()},
        "predict": {k: float(v["r2"]) for k, v in manager.predict_metrics.items()},
    }


def short_name(name: str) -> str:
    """``td_module.actor_network.module.0.module.0.3_fwd`` -> ``actor.3`` (see `LEGEND`)."""
    for prefix, short in SHORT_PREFIXES.items():
        if name.startswith(prefix):
            return short + name[len(prefix) :].removesuffix("_fwd")
    return name


def finished_returns(rewards: torch.Tensor, dones: torch.Tensor, carry: float) -> tuple[list[float], float]:
    """Undiscounted returns of the episodes that end in a batch of consecutive steps.

    Args:
        rewards: ``(N,)`` rewards of consecutive steps (episodes may span batches).
        dones: ``(N,)`` episode-end flags.
        carry: Reward accumulated by the episode still running at the end of the previous batch.

    Returns:
        The returns of the episodes that ended, and the carry for the next batch.
    """
    returns = []
    start = 0
    for end in dones.nonzero().flatten().tolist():
        returns.append(carry + rewards[start : end + 1].sum().item())
        carry, start = 0.0, end + 1
    return returns, carry + rewards[start:].sum().item()


def train(agent: Agent, env: EnvBase, args: argparse.Namespace, device: torch.device) -> None:
    """Standard TorchRL PPO: collect a batch, recompute GAE each epoch, minibatch Adam steps.

    The progress bar shows the mean return (undiscounted, stochastic policy) and length of the
    episodes that ended in the last batch.
    """
    collector = Collector(
        env,
        agent.actor,
        frames_per_batch=args.frames_per_batch,
        total_frames=args.frames,
        split_trajs=False,
        device=device,
    )
    buffer = ReplayBuffer(
        storage=LazyTensorStorage(max_size=args.frames_per_batch),
        sampler=SamplerWithoutReplacement(),
        batch_size=args.minibatch_size,
    )
    optim = torch.optim.Adam(agent.loss.parameters(), lr=args.lr)
    n_batches = max(1, args.frames // args.frames_per_batch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optim, n_batches, eta_min=0.0)
    n_minibatches = max(1, args.frames_per_batch // args.minibatch_size)
    progress = tqdm(total=args.frames, desc="PPO", unit="frames", dynamic_ncols=True)
    carry, last_return = 0.0, math.nan
    for batch in collector:
        for _ in range(args.epochs):
            with torch.no_grad():
                agent.advantage(batch)
            buffer.extend(batch.reshape(-1))
            for _ in range(n_minibatches):
                losses = agent.loss(buffer.sample())
                loss = sum(losses[k] for k in LOSS_KEYS)
                loss.backward()
                nn.utils.clip_grad_norm_(agent.loss.parameters(), args.max_grad_norm)
                optim.step()
                optim.zero_grad()
        scheduler.step()
        done = batch[DONE_KEY].reshape(-1)
        ep_len = (
            batch[NEXT_STEP_COUNT_KEY].reshape(-1)[done].float().mean().item() if done.any() else math.nan
        )
        returns, carry = finished_returns(batch[REWARD_KEY].reshape(-1), done, carry)
        last_return = sum(returns) / len(returns) if returns else last_return
        progress.set_postfix(episode_return=f"{last_return:.1f}", episode_len=f"{ep_len:.1f}")
        progress.update(batch.numel())
    progress.close()
    collector.shutdown(close_env=False)


def layer_rows(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> list[dict[str, Any]]:
    """One row per probed layer, actor first then critic, in layer order."""

    def order(name: str) -> tuple[int, int]:
        prefix = ACTOR_PREFIX if name.startswith(ACTOR_PREFIX) else CRITIC_PREFIX
        index = name[len(prefix) :].removesuffix("_fwd")
        return (0 if prefix == ACTOR_PREFIX else 1, int(index) if index.isdigit() else -1)

    return [
        {
            "layer": name,
            "train_r2_untrained": before["fit"].get(name, math.nan),
            "test_r2_untrained": before["predict"].get(name, math.nan),
            "train_r2_trained": after["fit"].get(name, math.nan),
            "test_r2_trained": after["predict"].get(name, math.nan),
        }
        for name in sorted(set(before["fit"]) | set(after["fit"]), key=order)
    ]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table with short layer names: layer | train/test R² untrained | train/test R² trained.

    The legend (`LEGEND`, printed after it) gives the full names and why neighbours share an R².
    """
    header = ("layer", "train R² untrained", "test R² untrained", "train R² trained", "test R² trained")
    names = [short_name(r["layer"]) for r in rows]
    width = max(len(header[0]), *(len(n) for n in names))
    lines = [f"{header[0]:<{width}} | " + " | ".join(f"{h:>18}" for h in header[1:])]
    lines.append("-" * len(lines[0]))
    cols = ("train_r2_untrained", "test_r2_untrained", "train_r2_trained", "test_r2_trained")
    lines += [f"{n:<{width}} | " + " | ".join(f"{r[c]:>18.3f}" for c in cols) for n, r in zip(names, rows)]
    return "\n".join(lines)


def save_plot(rows: Sequence[dict[str, Any]], path: Path, returns: dict[str, float]) -> None:
    """Test R² per layer, before and after training, one panel for the actor and one for the critic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = -1.0
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, prefix, title in ((axes[0], ACTOR_PREFIX, "actor MLP"), (axes[1], CRITIC_PREFIX, "critic MLP")):
        sel = [r for r in rows if r["layer"].startswith(prefix)]
        x = list(range(len(sel)))
        for key, label, marker in (
            ("test_r2_untrained", f"untrained (return {returns['untrained']:.0f})", "o"),
            ("test_r2_trained", f"trained (return {returns['trained']:.0f})", "s"),
        ):
            ax.plot(x, [max(r[key], floor) for r in sel], marker=marker, label=label)
        ax.set_xticks(x, [r["layer"][len(prefix) :].removesuffix("_fwd") for r in sel])
        ax.set_xlabel("layer index (even: Linear, odd: Tanh)")
        ax.set_title(f"{title}: linear probe for the action")
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test R² (clipped at {floor:g})")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=60_000, help="PPO training frames")
    parser.add_argument("--frames-per-batch", type=int, default=1_000, help="frames per collected batch")
    parser.add_argument("--probe-frames", type=int, default=4_000, help="frames of each probing dataset")
    parser.add_argument("--epochs", type=int, default=10, help="PPO epochs per batch")
    parser.add_argument("--minibatch-size", type=int, default=64, help="PPO minibatch size")
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (cosine-annealed)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    parser.add_argument("--eval-episodes", type=int, default=5, help="deterministic evaluation episodes")
    parser.add_argument("--eval-max-steps", type=int, default=1_000, help="step cap per evaluation episode")
    parser.add_argument("--seed", type=int, default=0, help="seed for torch and the environments")
    parser.add_argument("--out", type=Path, default=Path("out"), help="directory for the plot and JSON")
    parser.add_argument("--device", default="cpu", help="torch device (the demo is sized for cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 1 is fastest for these 32-wide MLPs and robust on a busy machine",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns the returns, the per-layer table and the output paths."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    env = make_env(args.seed, device)
    eval_env = make_env(args.seed + 1, device)
    agent = make_agent(env, device)

    untrained_return = evaluate(
        eval_env, agent.actor, episodes=args.eval_episodes, max_steps=args.eval_max_steps
    )
    print(f"untrained return: {untrained_return:.1f}")
    before = probe(agent, collect(env, agent, args.probe_frames, device), generator)

    train(agent, env, args, device)

    trained_return = evaluate(
        eval_env, agent.actor, episodes=args.eval_episodes, max_steps=args.eval_max_steps
    )
    print(f"trained return: {trained_return:.1f}")
    after = probe(agent, collect(env, agent, args.probe_frames, device), generator)
    env.close()
    eval_env.close()

    returns = {"untrained": untrained_return, "trained": trained_return}
    rows = layer_rows(before, after)
    print(format_table(rows))
    print(LEGEND)
    print(f"return: untrained {untrained_return:.1f} -> trained {trained_return:.1f}")

    args.out.mkdir(parents=True, exist_ok=True)
    plot_path, json_path = args.out / PLOT_NAME, args.out / JSON_NAME
    save_plot(rows, plot_path, returns)
    wall_time = time.perf_counter() - start
    result = {
        "frames": args.frames,
        "seed": args.seed,
        "returns": returns,
        "layers": rows,
        "wall_time_s": wall_time,
    }
    json_path.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    print(f"wrote {plot_path} and {json_path} ({wall_time:.0f} s)")
    return {**result, "plot": plot_path, "json": json_path}


if __name__ == "__main__":
    main()
