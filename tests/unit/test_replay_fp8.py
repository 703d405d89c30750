"""Routing Replay against a real FP8 actor: the embedded engine's W8A8 rollouts, the learner's step.

Shape legend: B = completions, T = positions, L = MoE layers, K = experts per token,
V = vocabulary.

The actor is `EmbeddedEngine(quantization="fp8")` serving a briefly cold-started tiny model; the
learner holds the same weights in fp32. FP8 flips some top-k choices (about 3% of the
(position, layer) pairs here), so without replay the learner routes some tokens differently
from the actor (Zheng et al. 2025, section 3.2):
- R3 replays the actor's trace in the proximal pass: routing agrees exactly and the
  train-inference KL (k3) drops;
- R2 with N = 1 replays what the learner would pick anyway: the same loss trace as no replay;
- R2 with N > 1: every mini-batch after the first still routes as the proximal pass did.
References are computed row by row, unpadded, in float64, outside `TrainStep`.
"""

import pyarrow as pa
import pytest
import torch

from actors.embedded import EmbeddedEngine
from actors.engine import SamplingParams
from async_rl.config import load_config
from async_rl.tasks import task_from_config
from async_rl.tokenizer import Tokenizer
from async_rl.types import RoutingSpec, Trajectory, group_to_batch
from learner.batch import pack
from learner.hf import import_hf
from learner.model import token_logprobs
from learner.optim import build_optimizer
from learner.routing import RoutingHooks
from learner.sft import run_sft
from learner.train import TrainStep, routing_agreement

G = 8
NUM_PROMPTS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A briefly cold-started checkpoint, its config, the FP8 rollouts and their packed batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same numbers on any machine (and the machine is shared)
    tmp = tmp_path_factory.mktemp("replay_fp8")
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp}",
            "run.name=sft",
            "run.eval_k=1",
            'task.ops=["+"]',
            "task.max_digits=1",
            "task.heldout_size=8",
            "sft.steps=40",
            "sft.batch_size=32",
        ],
    )
    torch.manual_seed(0)
    tok, task = Tokenizer.arithmetic(), task_from_config(cfg)
    path = tmp / "ckpt"
    run_sft(cfg, tok, task, path, log=lambda *_: None)
    engine = EmbeddedEngine(path, quantization="fp8")
    problems = [task.train_problem(i) for i in range(NUM_PROMPTS)]
    prompts = [tok.encode_prompt(p.prompt) for p in problems]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0)
    spec = RoutingSpec.of(cfg.model)
    batches, rollouts = [], []
    for problem, prompt, group in zip(
        problems, prompts, engine.generate(prompts, params, G), strict=True
    ):
        rows = [
            Trajectory(
                sample_id=f"{problem.prompt_id}-{i}",
                group_id=problem.prompt_id,
                prompt_id=problem.prompt_id,
                actor_id="a0",
                engine="embedded",
                policy_version=0,
                policy_version_max=0,
                prompt_tokens=prompt,
                completion_tokens=gen.tokens,
                behavior_logprobs=gen.logprobs,
                token_versions=gen.versions,
                routing=gen.routing,
                reward=float(i % 2),  # synthetic: nonzero advantages in every group
                finish_reason=gen.finish_reason,
                temperature=1.0,
                top_p=1.0,
                quantization="fp8",
            )
            for i, gen in enumerate(group)
        ]
        rollouts += rows
        batches.append(group_to_batch(rows, spec))
    batch = pack(pa.Table.from_batches(batches), spec, tok.pad_id)
    yield cfg, path, rollouts, batch
    torch.set_num_threads(threads)


def new_step(setup, replay: str, n: int = 1, lr: float = 1e-3) -> TrainStep:
    """A fresh learner on the checkpoint's weights, with the MiniRL loss."""
    cfg, path, _, _ = setup
    model, _ = import_hf(path, cfg.model)
    step_cfg = load_config(
        None,
        [
            f"algo.group_size={G}",
            f"algo.num_minibatches={n}",
            f"algo.routing_replay={replay}",
            f"learner.lr={lr}",
            "run.num_steps=100",
        ],
    )
    return TrainStep(model, build_optimizer(model, step_cfg.learner), step_cfg)


def per_row_reference(setup, replay: bool) -> dict[str, float]:
    """k1, k3 of KL(mu || pi_prox) over completion tokens and the routing agreement with the
    actor, one unpadded row at a time, log-probs in float64."""
    cfg, path, rollouts, _ = setup
    model, _ = import_hf(path, cfg.model)
    model.eval()
    hooks = RoutingHooks(model)
    log_rho, same = [], []
    for row in rollouts:
        seq = row.prompt_tokens + row.completion_tokens
        actor_TLK = torch.from_numpy(row.routing).long()
        with torch.no_grad(), hooks.record() as trace:
            if replay:
                with hooks.replay(actor_TLK[None]):
                    logits_TV = model(torch.tensor([seq[:-1]]))[0]
            else:
                logits_TV = model(torch.tensor([seq[:-1]]))[0]
        start = len(row.prompt_tokens) - 1
        logp_CV = torch.log_softmax(logits_TV[start:].double(), dim=-1)
        logp_C = logp_CV.gather(-1, torch.tensor(row.completion_tokens)[:, None])[:, 0]
        log_rho.append(logp_C - torch.tensor(row.behavior_logprobs, dtype=torch.float64))
        ours_TLK = trace.experts[0].long()
        same.append((actor_TLK.sort(-1).values == ours_TLK.sort(-1).values).all(-1).flatten())
    lr_N = torch.cat(log_rho)
    return {
        "train_infer_kl": (-lr_N).mean().item(),
        "train_infer_kl_k3": (lr_N.expm1() - lr_N).mean().item(),
        "routing_agreement": torch.cat(same).double().mean().item(),
    }


def test_r3_replays_the_fp8_actor_trace(setup):
    _, _, _, batch = setup
    free = new_step(setup, "none")(batch)
    r3 = new_step(setup, "r3")(batch)
    expected = per_row_reference(setup, replay=False)["routing_agreement"]
    print(
        f"\nrouting_agreement: none {free['routing_agreement']:.4f}, r3 {r3['routing_agreement']}"
    )
    assert free["routing_agreement"] == pytest.approx(expected, abs=1e-6)
    assert free["routing_agreement"] < 1.0  # FP8 flips experts: replay has work to do
    assert r3["routing_agreement"] == 1.0


def test_padding_of_a_replayed_trace_does_not_reach_real_tokens(setup):
    """R3 logits of a packed (right-padded) batch equal those of each row alone, unpadded."""
    cfg, path, rollouts, batch = setup
    model, _ = import_hf(path, cfg.model)
    model.eval()
    hooks = RoutingHooks(model)
    with torch.no_grad(), hooks.replay(batch.routing_BTLK):
        logp_BT = token_logprobs(model(batch.inputs_BT), batch.targets_BT)
    worst = 0.0
    for i, row in enumerate(rollouts):
        seq = row.prompt_tokens + row.completion_tokens
        with torch.no_grad(), hooks.replay(torch.from_numpy(row.routing)[None]):
            alone_T = token_logprobs(model(torch.tensor([seq[:-1]])), torch.tensor([seq[1:]]))[0]
        worst = max(worst, (logp_BT[i, : len(seq) - 1] - alone_T).abs().max().item())
    assert worst < 1e-4


def test_r3_lowers_the_train_infer_kl(setup):
    _, _, _, batch = setup
    free = new_step(setup, "none")(batch)
    r3 = new_step(setup, "r3")(batch)
    print(
        f"\nfp8 actor, {batch.num_rows} rows, {int(batch.mask_BT.sum())} completion tokens"
        f"\n  k1 none {free['train_infer_kl']:+.3e}  r3 {r3['train_infer_kl']:+.3e}"
        f"\n  k3 none {free['train_infer_kl_k3']:.3e}  r3 {r3['train_infer_kl_k3']:.3e}"
    )
    for metrics, replay in ((free, False), (r3, True)):
        ref = per_row_reference(setup, replay)
        assert metrics["train_infer_kl"] == pytest.approx(ref["train_infer_kl"], abs=1e-6)
        assert metrics["train_infer_kl_k3"] == pytest.approx(ref["train_infer_kl_k3"], rel=1e-3)
    # k3 is never negative and sums the mismatch of every token; k1's signs cancel.
    assert r3["train_infer_kl_k3"] < free["train_infer_kl_k3"]


def test_r2_with_one_minibatch_is_the_same_loss_trace_as_no_replay(setup):
    _, _, _, batch = setup
    traces = {}
    for mode in ("none", "r2"):
        step = new_step(setup, mode, lr=0.01)
        traces[mode] = [step(batch)["loss"] for _ in range(4)]
    assert traces["none"] == traces["r2"]
    assert len(set(traces["none"])) == 4  # the weights moved: later steps are not a repeat


def test_r2_minibatches_after_the_first_use_the_prox_routing(setup):
    """Mini-batches 2..N run with the proximal pass's routing, not the updated router's."""
    cfg, path, _, batch = setup
    n = 4
    size = batch.num_rows // n
    # The proximal routing, recorded independently on the starting weights.
    start, _ = import_hf(path, cfg.model)
    with torch.no_grad(), RoutingHooks(start).record() as trace:
        start.eval()(batch.inputs_BT)
    prox_BTLK = trace.experts

    step = new_step(setup, "r2", n=n, lr=0.05)
    model, original, objective = step.model, step._loss, step.objective
    checks, seen = [], {}

    class Objective:  # the step's objective, keeping the log-probs each loss is given
        advantages = objective.advantages

        def loss(self, logp_BT, *rest):
            seen["logp_BT"] = logp_BT.detach()
            return objective.loss(logp_BT, *rest)

    def spy(mb, i, prox, prox_BT, rows, recorded):  # an update's loss, under its replay
        out = original(mb, i, prox, prox_BT, rows, recorded)
        replay = step.hooks._replay_BTLK
        if replay is None:  # mini-batch 1, at the proximal weights
            return out
        i = len(checks) + 1  # mini-batches 2..N replay
        expected_BTLK = prox_BTLK[i * size : (i + 1) * size, : mb.inputs_BT.shape[1]]
        step.hooks._replay_BTLK = None
        with torch.no_grad():
            with step.hooks.replay(expected_BTLK):
                replayed_BT = token_logprobs(model(mb.inputs_BT), mb.targets_BT)
            with step.hooks.record() as free:
                free_BT = token_logprobs(model(mb.inputs_BT), mb.targets_BT)
        step.hooks._replay_BTLK = replay
        checks.append(
            {
                "replay": torch.equal(replay, expected_BTLK.long()),
                "logits": torch.equal(seen["logp_BT"], replayed_BT),
                "free_agreement": routing_agreement(expected_BTLK, free.experts, mb.mask_BT),
                "free_logp_diff": (free_BT - replayed_BT)[mb.mask_BT].abs().max().item(),
            }
        )
        return out

    step.objective, step._loss = Objective(), spy
    metrics = step(batch)
    assert len(checks) == n - 1 and metrics["routing_flip_update"] == 0.0
    assert all(c["replay"] and c["logits"] for c in checks)
    # After the first update the router would choose otherwise, and that would matter.
    assert min(c["free_agreement"] for c in checks) < 1.0
    assert max(c["free_logp_diff"] for c in checks) > 1e-4
