"""The three device layers compose: train -> encode (DP) -> mask (SecAgg+) -> unmask -> decode.

The parts are tested alone elsewhere; this checks what only shows when they meet: the encoded
length (padded to a power of two) is what SecAgg+ masks, the sum of survivors decodes to the
mean of exactly the survivors' clipped updates, and a round of training through all of it helps.
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from aggregator import model_zoo
from aggregator.compiler import compile_model
from aggregator.secagg.driver import Fleet, run_session
from aggregator.secagg.server import ServerConfig
from edge_sdk.privacy.encoding import EncodingParams, clip_l2, decode_sum, encode_update
from edge_sdk.privacy.noise import fresh_noise_generator, noise_mechanism
from edge_sdk.secagg.messages import Stage
from edge_sdk.training.data import prepare_dataset
from edge_sdk.training.loop import TrainConfig, evaluate, train_local
from edge_sdk.training.session import ModelSession
from edge_sdk.training.state import TrainingState

DEVICES = [f"dev-{i:02d}" for i in range(10)]


@pytest.fixture(scope="module")
def digits_setup(tmp_path_factory):
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.data))
    x, y = (digits.data[order] / 16.0).astype(np.float32), digits.target[order]
    bundle = tmp_path_factory.mktemp("bundle")
    compile_model(model_zoo.mlp((64, 64, 10), seed=0), bundle, loss="cross_entropy", optimizer="sgd")
    session = ModelSession.open(bundle)
    shards = np.array_split(np.arange(1400), len(DEVICES))
    device_data = {d: prepare_dataset(session.manifest, x[s], y[s]) for d, s in zip(DEVICES, shards, strict=True)}
    return session, device_data, prepare_dataset(session.manifest, x[1400:], y[1400:])


def local_updates(session, device_data, global_params, names):
    state = TrainingState(session)
    base = np.concatenate([global_params[n].reshape(-1) for n in names])
    updates = {}
    for device, data in device_data.items():
        state.set_params(global_params)
        train_local(state, data, TrainConfig(epochs=3, batch_size=16, lr=0.2, seed=1))
        updates[device] = np.concatenate([state.get_params()[n].reshape(-1) for n in names]) - base
    return base, updates


def test_survivors_sum_decodes_to_the_mean_of_their_clipped_updates(digits_setup):
    session, device_data, _ = digits_setup
    global_params = TrainingState(session).get_params()
    names = sorted(global_params)
    _, updates = local_updates(session, device_data, global_params, names)
    dim = next(iter(updates.values())).size
    params = EncodingParams(dim=dim, clip=1.0, gamma=1e-5, bits=24, rotation_seed=secrets.token_bytes(16))
    inputs = {d: encode_update(u, params, noise_mechanism("skellam"), 0.0, fresh_noise_generator())
              for d, u in updates.items()}
    assert all(v.dtype == np.uint32 and v.shape == (params.padded_dim,) for v in inputs.values())

    fleet = Fleet.enrol(DEVICES)
    # (8, 5): a strict majority with spare holders for two dropouts; t_honest = 6 here (the noise is 0: the check
    # is the decoded mean), so 8 survivors minus the one assumed colluder clear the noise floor.
    config = ServerConfig(fleet.server_identity, fleet.enrolled, bits=params.bits, vector_length=params.padded_dim,
                          degree=8, threshold=5, noise_floor=6)
    outcome = run_session(fleet, config, inputs, drop_at={Stage.MASKED_INPUT: {"dev-03", "dev-07"}})
    assert not outcome.aborted, outcome.abort_reason
    survivors = sorted(outcome.server.contributors)
    assert survivors == [d for d in DEVICES if d not in {"dev-03", "dev-07"}]

    decoded = decode_sum(outcome.result, params, len(survivors))[:dim]
    expected = np.mean([clip_l2(updates[d], params.clip) for d in survivors], axis=0)
    # Each device's stochastic rounding moves each rotated coordinate by less than one step gamma.
    assert np.linalg.norm(decoded - expected) <= params.gamma * np.sqrt(params.padded_dim)
    assert np.linalg.norm(expected) > 100 * params.gamma * np.sqrt(params.padded_dim)  # the check has teeth


def test_a_noisy_masked_round_of_fedavg_improves_the_model(digits_setup):
    session, device_data, test = digits_setup
    state = TrainingState(session)
    global_params = state.get_params()
    names = sorted(global_params)
    before = evaluate(state, test)
    base, updates = local_updates(session, device_data, global_params, names)
    params = EncodingParams(dim=base.size, clip=2.0, gamma=2e-5, bits=22, rotation_seed=secrets.token_bytes(16))
    # Central noise std 0.1*C split over t_honest=8 devices: a real, if generous, privacy setting.
    variance = (0.1 * params.clip / params.gamma) ** 2 / 8
    inputs = {d: encode_update(u, params, noise_mechanism("skellam"), variance, fresh_noise_generator())
              for d, u in updates.items()}
    fleet = Fleet.enrol(DEVICES)
    config = ServerConfig(fleet.server_identity, fleet.enrolled, bits=params.bits, vector_length=params.padded_dim,
                          degree=8, threshold=5, noise_floor=8)  # the t_honest the noise above was split over
    outcome = run_session(fleet, config, inputs, drop_at={Stage.UNMASK: {"dev-01"}})
    assert not outcome.aborted and len(outcome.server.contributors) == len(DEVICES)
    mean_update = decode_sum(outcome.result, params, len(DEVICES))[: base.size]
    offset = 0
    new_params = {}
    for name in names:
        size = global_params[name].size
        new_params[name] = (global_params[name].reshape(-1) + mean_update[offset : offset + size]).reshape(
            global_params[name].shape).astype(global_params[name].dtype)
        offset += size
    state.set_params(new_params)
    after = evaluate(state, test)
    assert after.loss < before.loss - 0.2
    assert after.accuracy > before.accuracy + 0.3
