"""The simulation-only seeds of SecAgg+ (``ServerConfig.nonce_seed``, ``ClientConfig.key_seed``) and their defaults.

What is proved here: left at their defaults (every production path), the server draws a fresh
round nonce and a device fresh agreement keys and self-mask seed each time, so two openings of the
same round differ; with a seed, both are a function of (seed, device, round) only, so a simulation
reproduces its rosters byte for byte, while other devices and rounds still get other keys; and a
seeded session still sums exactly (the keys are ordinary X25519 keys).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from aggregator.secagg.driver import Fleet, run_session
from aggregator.secagg.server import ServerConfig, start_server
from edge_sdk.secagg.client import handle_client, start_client
from edge_sdk.secagg.keys import AgreementKey

DEVICES = tuple(f"dev-{i}" for i in range(6))
LENGTH, BITS = 8, 16


def _setup(nonce_seed: bytes | None = None) -> tuple[Fleet, ServerConfig]:
    fleet = Fleet.enrol(DEVICES)
    config = ServerConfig(fleet.server_identity, fleet.enrolled, BITS, LENGTH, degree=5, threshold=4, noise_floor=1,
                          nonce_seed=nonce_seed)
    return fleet, config


def _advert(fleet: Fleet, server: ServerConfig, device: str, round_index: int, key_seed: bytes | None):
    """The AdvertiseKeys ``device`` answers the RoundStart of ``round_index`` with."""
    state, out = start_server(server, DEVICES, round_index, 0.0)
    client = start_client(dataclasses.replace(fleet.client_config(device), key_seed=key_seed),
                          np.zeros(LENGTH, np.uint32), 0.0, round_index, t_honest=state.noise_floor)
    client, sent = handle_client(client, dict(out)[device], 0.0)
    return client, sent[0]


def test_by_default_every_round_nonce_and_every_key_is_fresh():
    fleet, server = _setup()
    nonces = {start_server(server, DEVICES, 3, 0.0)[0].round_nonce for _ in range(3)}
    assert len(nonces) == 3  # the same round opened three times: three nonces from the OS
    first, advert_1 = _advert(fleet, server, DEVICES[0], 3, None)
    second, advert_2 = _advert(fleet, server, DEVICES[0], 3, None)
    assert first.c_key.private != second.c_key.private and first.s_key.private != second.s_key.private
    assert first.self_seed != second.self_seed
    assert advert_1.c_public != advert_2.c_public and advert_1.self_mask_commitment != advert_2.self_mask_commitment


def test_a_seeded_nonce_depends_on_the_seed_and_round_only():
    fleet, server = _setup(nonce_seed=b"s" * 32)
    _, other = _setup(nonce_seed=b"s" * 32)  # another fleet and server identity, the same seed

    def nonce(config: ServerConfig, round_index: int, now: float = 0.0) -> bytes:
        return start_server(config, DEVICES, round_index, now)[0].round_nonce

    assert nonce(server, 3) == nonce(other, 3, 5.0)
    assert nonce(server, 3) != nonce(server, 4)
    assert nonce(server, 3) != nonce(dataclasses.replace(server, nonce_seed=b"t" * 32), 3)


def test_seeded_keys_depend_on_the_seed_device_and_round_only():
    fleet, server = _setup()
    seed = b"k" * 32
    first, advert_1 = _advert(fleet, server, DEVICES[0], 3, seed)
    second, advert_2 = _advert(fleet, server, DEVICES[0], 3, seed)  # another round nonce, the same keys
    assert (first.c_key, first.s_key, first.self_seed) == (second.c_key, second.s_key, second.self_seed)
    assert advert_1.c_public == advert_2.c_public and advert_1.self_mask_commitment == advert_2.self_mask_commitment
    assert first.c_key.public == AgreementKey(first.c_key.private).public  # an ordinary X25519 key pair
    other_device, _ = _advert(fleet, server, DEVICES[1], 3, seed)
    next_round, _ = _advert(fleet, server, DEVICES[0], 4, seed)
    other_seed, _ = _advert(fleet, server, DEVICES[0], 3, b"l" * 32)
    privates = {s.c_key.private for s in (first, other_device, next_round, other_seed)} | {first.s_key.private}
    assert len(privates) == 5


def test_a_seeded_session_sums_exactly():
    fleet, server = _setup(nonce_seed=b"n" * 32)
    rng = np.random.default_rng(0)
    inputs = {d: rng.integers(0, 2**BITS, LENGTH, dtype=np.uint32) for d in DEVICES}
    configs = {d: dataclasses.replace(fleet.client_config(d), key_seed=d.encode() * 4) for d in DEVICES}
    outcome = run_session(fleet, server, inputs, client_configs=configs)
    expected = sum(v.astype(np.int64) for v in inputs.values()) % 2**BITS
    assert np.array_equal(outcome.server.result, expected)
