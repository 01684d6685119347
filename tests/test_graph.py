"""The CUDA-graph step's pieces: capturable optimisers with a tensor learning rate, the graphed trainer."""
import warnings

import pytest
import torch

from fastkd.train.optim import CapturableSGD
from tests.test_engine import make


def _run(optimizer_factory, steps=5, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt, set_lr = optimizer_factory(model.parameters())
    x, y = torch.randn(16, 7), torch.randint(0, 3, (16,))
    for step in range(steps):
        set_lr(0.1 / (step + 1))  # the learning rate changes every step, as under a schedule
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.9, False, 5e-4), (0.9, True, 1e-2)])
def test_capturable_sgd_matches_torch_sgd(momentum, nesterov, weight_decay):
    def reference(params):
        opt = torch.optim.SGD(params, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        return opt, lambda v: [g.__setitem__("lr", v) for g in opt.param_groups]

    def capturable(params):
        lr = torch.tensor(0.1)
        opt = CapturableSGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        return opt, lr.fill_

    expect, ref_opt = _run(reference)
    got, cap_opt = _run(capturable)
    for e, g in zip(expect, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
    if momentum:  # the same state layout, so checkpoints of either load into the other
        for p_ref, p_cap in zip(ref_opt.state, cap_opt.state):
            torch.testing.assert_close(cap_opt.state[p_cap]["momentum_buffer"], ref_opt.state[p_ref]["momentum_buffer"],
                                       rtol=1e-6, atol=1e-7)


def test_capturable_sgd_wants_a_tensor_lr():
    with pytest.raises(TypeError, match="lr must be a one-element tensor"):
        CapturableSGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)


ENGINE = {"ce": {"weight": 1.0}, "kd": {"weight": 0.9}, "crd": {"weight": 0.8, "num_negatives": 20, "feat_dim": 8}}


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_graphed_trainer_machinery_matches_the_eager_run_on_cpu(optim, tmp_path):
    """Without CUDA the graphed step's machinery (lr tensor, capturable optimiser) runs eagerly when asked
    for explicitly, and trains like the eager run."""
    recipe = {"optim": {"name": optim, "lr": 0.05 if optim == "sgd" else 1e-3}, "schedule": {"name": "cosine"}}
    eager = make(ENGINE, tmp_path / "eager", epochs=2, **recipe)
    eager.fit(log=None)
    graphed = make(ENGINE, tmp_path / "graph", epochs=2, **recipe)
    graphed.use_graph_step()
    assert graphed.lr is not None and graphed.graph is not None and not graphed.graph.enabled
    graphed.fit(log=None)
    for a, b in zip(eager.history, graphed.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["lr"] == pytest.approx(a["lr"])
    assert graphed.history[-1]["lr"] < graphed.history[0]["lr"]  # the schedule reached the tensor lr
    assert float(graphed.lr) == pytest.approx(graphed.history[-1]["lr"])


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_cuda_graph_step_matches_the_eager_step(amp, tmp_path):
    recipe = {"schedule": {"name": "cosine"}, "amp": amp}
    eager = make(ENGINE, tmp_path / "eager", epochs=3, device="cuda", **recipe)
    eager.fit(log=None)
    with warnings.catch_warnings():
        # no fallback warning (a RuntimeWarning): the graph is captured; other warnings (a deprecation in the
        # installed torch, say) are not this test's business
        warnings.simplefilter("error", RuntimeWarning)
        graphed = make(ENGINE, tmp_path / "graph", epochs=3, device="cuda", cuda_graph=True, **recipe)
        graphed.fit(log=None)
    assert graphed.graph.enabled and graphed.graph.captures == 3 and graphed.graph.replays > 0
    tol = 2e-2 if amp == "bf16" else 1e-4
    for a, b in zip(eager.history, graphed.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=tol)
    crd_e, crd_g = eager.distiller.criteria["crd"], graphed.distiller.criteria["crd"]
    assert torch.equal(crd_e.rng_state, crd_g.rng_state)  # the sampler advanced once per step in both


def test_cuda_graph_without_cuda_is_the_eager_run(tmp_path):
    """cuda_graph=true on a machine without CUDA warns and then runs exactly what cuda_graph=false runs:
    the same optimiser, the same numbers to the last bit."""
    recipe = {"optim": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "cosine"}}
    eager = make(ENGINE, tmp_path / "eager", epochs=2, **recipe)
    eager.fit(log=None)
    with pytest.warns(RuntimeWarning, match="cuda_graph=true needs a CUDA device.*same run as cuda_graph=false"):
        asked = make(ENGINE, tmp_path / "graph", epochs=2, cuda_graph=True, **recipe)
    assert asked.graph is None and asked.lr is None and type(asked.optimizer) is type(eager.optimizer)
    asked.fit(log=None)
    assert [r["train_loss"] for r in asked.history] == [r["train_loss"] for r in eager.history]
    for name, value in eager.distiller.student.state_dict().items():
        assert torch.equal(asked.distiller.student.state_dict()[name], value), name
