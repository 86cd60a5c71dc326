"""One fused optimiser step matches the torch.optim update rule (numpy reference, and PyTorch itself
when it is installed), including weight decay, Adam's bias correction at step > 1 and carried state."""

from __future__ import annotations

import compiler_numpy_reference as ref
import numpy as np
import pytest
from compiler_harness import GraphRunner, assert_standard_graph, make_batch, train_step
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import model_zoo
from aggregator.compiler import CompileError, compile_graphs

MLP_LAYERS = [ref.Flatten(), ref.Linear("layers.0.weight", "layers.0.bias"), ref.Activation("relu"),
              ref.Linear("layers.2.weight", "layers.2.bias")]

CASES = {
    "sgd": {"weight_decay": 0.1},
    "momentum": {"momentum": 0.8, "weight_decay": 0.05},
    "adam": {"beta1": 0.85, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.02},
    "adamw": {"beta1": 0.9, "beta2": 0.995, "eps": 1e-7, "weight_decay": 0.3},
}


def random_state(compiled, seed):
    """Random optimiser state in torch's convention, keyed by graph input."""
    rng = np.random.default_rng(seed)
    state = {}
    for s in compiled.manifest.state:
        value = rng.standard_normal(s.shape)
        state[s.input] = np.abs(value) if s.kind == "v" else value  # Adam's v is a running mean of g^2
    return state


def stored(compiled, state):
    """The graph's representation of torch-convention state (each tensor times its manifest scale)."""
    scales = {s.input: s.scale for s in compiled.manifest.state}
    return {name: value * value.dtype.type(scales[name]) for name, value in state.items()}


def test_adam_v_is_stored_scaled_and_everything_else_as_torch_holds_it():
    compiled = compile_graphs(model_zoo.mlp((4, 3)), loss="mse", optimizer="adam",
                              optimizer_params={"beta1": 0.8, "beta2": 0.99})
    assert {s.kind: s.scale for s in compiled.manifest.state} == {"m": 1.0, "v": pytest.approx(0.2**2 / 0.01)}


@pytest.mark.parametrize("optimizer", sorted(CASES))
@pytest.mark.parametrize("weight_decay", [False, True], ids=["no_decay", "decay"])
def test_one_step_matches_reference_update(optimizer, weight_decay):
    hp = dict(CASES[optimizer]) if weight_decay else {**CASES[optimizer], "weight_decay": 0.0}
    compiled = compile_graphs(model_zoo.mlp((6, 5, 3)), loss="cross_entropy", optimizer=optimizer,
                              optimizer_params=hp, dtype="float64")
    assert_standard_graph(compiled.train_step)
    assert compiled.manifest.optimizer_params == {**compiled.manifest.optimizer_params, **hp}
    m = compiled.manifest
    x, y = make_batch(compiled, 5, seed=1)
    params = compiled.initial_params
    state = random_state(compiled, seed=2)
    step, lr = 3, 0.07
    out = train_step(compiled, GraphRunner(compiled.train_step), params, x, y, lr=lr, step=step,
                     state=stored(compiled, state))
    _, grads = ref.loss_and_gradients(MLP_LAYERS, params, x, y, "cross_entropy")
    for p in m.trainable:
        own = {s.kind: state[s.input] for s in m.state if s.param == p.name}
        expected, expected_state = ref.optimizer_step(optimizer, m.optimizer_params, params[p.name],
                                                      grads[p.name], own, lr, step)
        np.testing.assert_allclose(out[p.output], expected, rtol=1e-9, atol=1e-12, err_msg=p.name)
        for s in m.state:
            if s.param == p.name:
                np.testing.assert_allclose(out[s.output] / s.scale, expected_state[s.kind], rtol=1e-9, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    beta1=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.9999), eps=st.floats(1e-10, 1e-2),
    weight_decay=st.floats(0.0, 0.5), lr=st.floats(1e-4, 1.0), step=st.integers(1, 10_000),
    decoupled=st.booleans(),
)
def test_adam_update_matches_reference_for_any_hyperparameters(beta1, beta2, eps, weight_decay, lr, step, decoupled):
    optimizer = "adamw" if decoupled else "adam"
    hp = {"beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay}
    compiled = compile_graphs(model_zoo.mlp((4, 3)), loss="mse", optimizer=optimizer, optimizer_params=hp,
                              dtype="float64")
    x, y = make_batch(compiled, 3, seed=step)
    state = random_state(compiled, seed=step)
    out = train_step(compiled, GraphRunner(compiled.train_step), compiled.initial_params, x, y, lr=lr, step=step,
                     state=stored(compiled, state))
    _, grads = ref.loss_and_gradients([ref.Flatten(), ref.Linear("layers.0.weight", "layers.0.bias")],
                                      compiled.initial_params, x, y, "mse")
    for p in compiled.manifest.trainable:
        own = {s.kind: state[s.input] for s in compiled.manifest.state if s.param == p.name}
        expected, expected_state = ref.optimizer_step(optimizer, hp, compiled.initial_params[p.name],
                                                      grads[p.name], own, lr, step)
        np.testing.assert_allclose(out[p.output], expected, rtol=1e-8, atol=1e-12)
        for s in compiled.manifest.state:
            if s.param == p.name:
                np.testing.assert_allclose(out[s.output] / s.scale, expected_state[s.kind], rtol=1e-8, atol=1e-12)


def test_sgd_with_lr_zero_leaves_parameters_unchanged():
    compiled = compile_graphs(model_zoo.mlp((6, 5, 3)), loss="cross_entropy", optimizer="sgd")
    x, y = make_batch(compiled, 4)
    out = train_step(compiled, GraphRunner(compiled.train_step), compiled.initial_params, x, y, lr=0.0)
    for p in compiled.manifest.trainable:
        np.testing.assert_array_equal(out[p.output], compiled.initial_params[p.name])


@pytest.mark.parametrize(("optimizer", "params", "message"), [
    ("adam", {"momentum": 0.9}, "has no hyper-parameter 'momentum'"),
    ("adam", {"beta1": 1.0}, "beta1 must be in [0, 1)"),
    ("adamw", {"eps": 0.0}, "eps must be positive"),
    ("sgd", {"weight_decay": -1}, "weight_decay must be >= 0"),
    ("rmsprop", None, "optimizer must be one of"),
])
def test_bad_optimizer_options_are_rejected_with_the_reason(optimizer, params, message):
    with pytest.raises(CompileError, match=message.replace("[", r"\[").replace(")", r"\)")):
        compile_graphs(model_zoo.mlp((4, 3)), loss="mse", optimizer=optimizer, optimizer_params=params)


@pytest.mark.parametrize("optimizer", sorted(CASES))
def test_three_steps_match_pytorch(optimizer):
    torch = pytest.importorskip("torch")
    hp = CASES[optimizer]
    compiled = compile_graphs(model_zoo.mlp((6, 5, 3)), loss="cross_entropy", optimizer=optimizer,
                              optimizer_params=hp, dtype="float64")
    m = compiled.manifest
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).double()
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            tensor.copy_(torch.from_numpy(np.array(compiled.initial_params[f"layers.{name}"])))
    lr = 0.05
    if optimizer in ("sgd", "momentum"):
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=hp.get("momentum", 0.0),
                              weight_decay=hp["weight_decay"])
    else:
        cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
        opt = cls(net.parameters(), lr=lr, betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                  weight_decay=hp["weight_decay"])
    runner = GraphRunner(compiled.train_step)
    params = dict(compiled.initial_params)
    state = {s.input: np.zeros(s.shape) for s in m.state}
    for step in range(1, 4):
        x, y = make_batch(compiled, 5, seed=step)
        out = train_step(compiled, runner, params, x, y, lr=lr, step=step, state=state)
        params = {p.name: out[p.output] for p in m.trainable}
        state = {s.input: out[s.output] for s in m.state}
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        np.testing.assert_allclose(out["loss"], loss.item(), rtol=1e-12)
    for name, tensor in net.state_dict().items():
        np.testing.assert_allclose(params[f"layers.{name}"], tensor.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("optimizer", sorted(CASES))
def test_float32_step_in_onnxruntime_matches_reference(optimizer):
    """The float32 graphs fold optimiser constants into Gemm's alpha/beta; the result must not change."""
    compiled = compile_graphs(model_zoo.mlp((6, 5, 3)), loss="cross_entropy", optimizer=optimizer,
                              optimizer_params={**CASES[optimizer], "weight_decay": 0.0})
    m = compiled.manifest
    gemms = [n for n in compiled.train_step.graph.node if n.op_type == "Gemm"]
    if optimizer in ("adam", "adamw"):  # the weight-gradient Gemm emits (1 - beta1) * g directly
        alphas = [a.f for n in gemms for a in n.attribute if a.name == "alpha"]
        assert any(np.isclose(a, 1 - CASES[optimizer]["beta1"]) for a in alphas)
    else:  # the update accumulates into the parameter (sgd) or velocity (momentum) inside the Gemm
        accumulators = {p.input for p in m.trainable} | {s_.input for s_ in m.state}
        assert any(len(n.input) == 3 and n.input[2] in accumulators for n in gemms)
    x, y = make_batch(compiled, 5, seed=1)
    state = {k: v.astype(np.float32) for k, v in random_state(compiled, seed=2).items()}
    out = train_step(compiled, GraphRunner(compiled.train_step), compiled.initial_params, x, y, lr=0.07, step=3,
                     state=stored(compiled, state))
    _, grads = ref.loss_and_gradients(MLP_LAYERS, compiled.initial_params, x, y, "cross_entropy")
    for p in m.trainable:
        own = {s.kind: state[s.input].astype(np.float64) for s in m.state if s.param == p.name}
        expected, expected_state = ref.optimizer_step(optimizer, m.optimizer_params, compiled.initial_params[p.name],
                                                      grads[p.name], own, 0.07, 3)
        np.testing.assert_allclose(out[p.output], expected, rtol=1e-5, atol=1e-6, err_msg=p.name)
        for s in m.state:
            if s.param == p.name:
                np.testing.assert_allclose(out[s.output] / s.scale, expected_state[s.kind], rtol=1e-5, atol=1e-6)
