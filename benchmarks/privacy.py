"""Distributed-DP benchmark: each encoder stage at d = 10^6 against floors measured in the same run,
the rotations at d = 10^5 and 10^6, the bytes a device sends, and the accountant's time for 1,000 rounds.

Run: .venv/bin/python benchmarks/privacy.py   (pins BLAS/OpenMP to one thread: the target is one core)
Targets (issue 4): whole encoder <= 150 ms at d = 10^6 on one core; accountant for 1,000 rounds < 1 s.
Target (issue 10): bytes per device per round <= (b/32 + 0.01) x the float32 model at b = 20, d = 10^5.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from aggregator.accounting.accountant import _CURVE_CACHE, FleetAccountant, epsilon_of  # noqa: E402
from aggregator.accounting.calibration import calibrate  # noqa: E402
from aggregator.accounting.events import round_dp_event  # noqa: E402
from edge_sdk.privacy.encoding import (  # noqa: E402
    EncodingParams,
    add_noise,
    clip_l2,
    decode_sum,
    encode_update,
    scale,
    to_modular,
)
from edge_sdk.privacy.modes import PrivacyMode, local_noise_variance  # noqa: E402
from edge_sdk.privacy.noise import fresh_noise_generator, noise_mechanism  # noqa: E402
from edge_sdk.privacy.participation import participation_event  # noqa: E402
from edge_sdk.privacy.rotation import OVERLAP, POW2, make_rotation, rotation_signs  # noqa: E402
from edge_sdk.privacy.rounding import conditional_stochastic_round, stochastic_round  # noqa: E402

DIM = 10**6
REPEATS = 7
ROTATION_DIMS = (10**5, 10**6)
WIRE_BITS = 20


def median_ms(fn, setup=lambda: None, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        arg = setup()
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def butterfly_fwht(x: np.ndarray) -> np.ndarray:
    """The textbook in-place radix-2 FWHT in numpy: the floor the issue quotes (~33 ms at 2^20)."""
    tmp = np.empty(x.size // 2, dtype=x.dtype)
    h = 1
    while h < x.size:
        y = x.reshape(-1, 2, h)
        a, b = y[:, 0, :], y[:, 1, :]
        t = tmp.reshape(a.shape)
        np.subtract(a, b, out=t)
        a += b
        b[...] = t
        h *= 2
    return x


def dft_rotate(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """TFF's DiscreteFourierTransform alternative: signs, then a unitary FFT of the d/2 complex pairs."""
    return np.fft.fft((x * signs).view(np.complex64), norm="ortho").astype(np.complex64).view(np.float32)


def spike_peak(rotate, dim: int) -> float:
    """max |y| * sqrt(d) / ||x|| for a spike on the last coordinate (1 = perfectly flat)."""
    x = np.zeros(dim, dtype=np.float32)
    x[-1] = 1.0
    return float(np.abs(rotate(x)).max()) * np.sqrt(dim)


def rotation_table() -> None:
    """The padded and unpadded rotations next to numpy baselines, and their worst-case flatness."""
    rng = np.random.default_rng(1)
    seed = bytes(range(16))
    print(f"{'rotation (one thread, median ms)':<30}{'d':>9}{'length':>9}{'ms':>8}{'spike peak':>12}")
    for dim in ROTATION_DIMS:
        x = rng.standard_normal(dim).astype(np.float32)
        signs = rotation_signs(seed, dim)
        for name in (POW2, OVERLAP):
            rotation = make_rotation(name, seed, dim)
            rotation.rotate(x)  # warm the sign cache, as a device would per round
            ms = median_ms(rotation.rotate, lambda x=x: x)
            print(f"{name:<30}{dim:>9}{rotation.encoded_dim:>9}{ms:>8.2f}{spike_peak(rotation.rotate, dim):>12.3f}")
        padded = make_rotation(POW2, seed, dim).encoded_dim
        window = make_rotation(OVERLAP, seed, dim).spread_dim
        rows = [
            (f"baseline: textbook FWHT {padded}", padded,
             median_ms(butterfly_fwht, lambda n=padded: rng.standard_normal(n).astype(np.float32)), None),
            (f"baseline: 2 x textbook FWHT {window}", dim,
             2 * median_ms(butterfly_fwht, lambda n=window: rng.standard_normal(n).astype(np.float32)), None),
            ("baseline: DFT rotation (np.fft)", dim, median_ms(lambda v, s=signs: dft_rotate(v, s), lambda x=x: x),
             spike_peak(lambda v, s=signs: dft_rotate(v, s), dim)),
            ("baseline: x * signs (memory)", dim, median_ms(lambda v, s=signs: v * s, lambda x=x: x), None),
        ]
        for name, length, ms, peak in rows:
            tail = f"{peak:>12.3f}" if peak is not None else ""
            print(f"{name:<30}{dim:>9}{length:>9}{ms:>8.2f}{tail}")
    print("spike peak = max|y| sqrt(d)/||x|| for x on the last coordinate: sqrt(d/spread_dim); "
          "the calibration's wrap bound assumes exactly that")


def bytes_table() -> None:
    """What one device sends per round, bit-packed at b bits per entry, against the float32 model."""
    target = WIRE_BITS / 32 + 0.01
    print(f"{'bytes per device per round, b = 20':<36}{'d':>9}{'length':>9}{'bytes':>10}{'float32':>10}"
          f"{'ratio':>8}{'target':>8}")
    for dim in ROTATION_DIMS:
        for name in (POW2, OVERLAP):
            length = make_rotation(name, bytes(16), dim).encoded_dim
            sent = -(-length * WIRE_BITS // 8)  # ceil(length * b / 8)
            ratio = sent / (4 * dim)
            verdict = "ok" if ratio <= target else "over"
            print(f"{name:<36}{dim:>9}{length:>9}{sent:>10}{4 * dim:>10}{ratio:>8.4f}{target:>8.4f} {verdict}")


def main() -> None:
    rotation_table()
    print()
    bytes_table()
    print()
    rng = np.random.default_rng(0)
    update = rng.standard_normal(DIM).astype(np.float32)
    cal = calibrate(target_epsilon=3.0, delta=1e-6, cohort_size=100, rounds=100, dim=DIM, bits=20,
                    population=10**5, dropout_fraction=0.05, colluding_fraction=0.05)
    params = EncodingParams(dim=DIM, clip=cal.clip, gamma=cal.gamma, bits=20, rotation_seed=bytes(range(16)))
    central = (cal.noise_multiplier * cal.clip / cal.gamma) ** 2
    local = local_noise_variance(PrivacyMode.DISTRIBUTED, central, cal.honest_contributors)
    noise_rng = fresh_noise_generator()
    rotation = params.rotator
    rotation.rotate(np.zeros(DIM, dtype=np.float32))  # warm the sign cache, as a device would per round

    n = params.padded_dim  # the encoded length: DIM itself with the default rotation
    window = params.spread_dim
    floor_fwht = 2 * median_ms(butterfly_fwht, lambda: rng.standard_normal(window).astype(np.float32))
    floor_round = median_ms(
        lambda x: stochastic_round(x, noise_rng), lambda: rng.uniform(-50, 50, DIM).astype(np.float32)
    )

    floor_poisson = median_ms(lambda m: noise_rng.poisson(m, n), lambda: local / 2.0)
    floor_geometric = median_ms(lambda m: noise_rng.geometric(m, n), lambda: 1e-4)

    clipped = clip_l2(update, params.clip)
    rotated = rotation.rotate(clipped)
    scaled = scale(rotated.copy(), params.gamma)
    rounded = conditional_stochastic_round(scaled, params.l2_sensitivity, noise_rng)
    skellam, dgauss = noise_mechanism("skellam"), noise_mechanism("discrete_gaussian")
    stages = [
        ("clip (L2, float32)", median_ms(lambda u: clip_l2(u, params.clip), lambda: update.copy()), None),
        (f"rotate ({params.rotation})", median_ms(rotation.rotate, lambda: clipped), floor_fwht),
        ("scale 1/gamma", median_ms(lambda r: scale(r, params.gamma), lambda: rotated.copy()), None),
        (f"round (conditional, {n})", median_ms(
            lambda s: conditional_stochastic_round(s, params.l2_sensitivity, noise_rng), lambda: scaled), floor_round),
        ("noise: skellam", median_ms(
            lambda r: add_noise(r, skellam, local, noise_rng), lambda: rounded.copy()), 2 * floor_poisson),
        ("noise: discrete_gaussian", median_ms(
            lambda r: add_noise(r, dgauss, local, noise_rng), lambda: rounded.copy()), 2 * floor_geometric),
        ("mod 2^b -> uint32", median_ms(lambda r: to_modular(r, params.bits), lambda: rounded.copy()), None),
    ]
    whole = {
        name: median_ms(lambda u, m=mech: encode_update(u, params, m, local, noise_rng), lambda: update)
        for name, mech in (("skellam", skellam), ("discrete_gaussian", dgauss))
    }
    total = np.zeros(n, dtype=np.uint32)
    decode = median_ms(lambda t: decode_sum(t, params, 100), lambda: total)

    print(f"encoder, d = {DIM} (encoded length {n}, {params.rotation}), b = 20, gamma = {cal.gamma:.3g}, "
          f"local variance = {local:.3g}, one thread; median of {REPEATS}")
    print(f"{'stage':<36}{'median ms':>10}{'floor ms':>10}{'ratio':>8}")
    print(f"{'floor: 2 x textbook FWHT ' + str(window):<36}{floor_fwht:>10.2f}")
    print(f"{'floor: plain stochastic rounding':<36}{floor_round:>10.2f}")
    print(f"{'floor: 2 x numpy Poisson ' + str(n):<36}{2 * floor_poisson:>10.2f}")
    print(f"{'floor: 2 x numpy geometric ' + str(n):<36}{2 * floor_geometric:>10.2f}")
    for name, ms, floor in stages:
        tail = f"{floor:>10.2f}{ms / floor:>8.2f}" if floor else ""
        print(f"{name:<36}{ms:>10.2f}{tail}")
    for name, ms in whole.items():
        print(f"{'WHOLE encoder (' + name + ')':<36}{ms:>10.2f}{150.0:>10.2f}{ms / 150.0:>8.2f}   <- target 150 ms")
    print(f"{'decode sum (aggregator)':<36}{decode:>10.2f}")

    # Accountant: 1,000 rounds.
    event = participation_event(params, "distributed", "skellam", cal.noise_multiplier, cal.honest_contributors)
    sampled = participation_event(params, "distributed", "skellam", cal.noise_multiplier, cal.honest_contributors,
                                  sampling_probability=1e-3)
    from dp_accounting.rdp import rdp_privacy_accountant

    def per_round_calls(ev):
        acc = rdp_privacy_accountant.RdpAccountant()
        for _ in range(1000):
            acc.compose(ev)
            acc.get_epsilon(1e-6)

    def fleet_reports(ev):
        fa = FleetAccountant(delta=1e-6)
        for r in range(1000):
            fa.record_round(str(r), ev, {f"dev-{i}": ev for i in range(10)})

    gaussian = __import__("dp_accounting").dp_event.GaussianDpEvent(cal.noise_multiplier)
    def cold(ev):
        _CURVE_CACHE.clear()  # time the curve computation too, not just a cache hit
        return ev

    rows = [
        ("1000 rounds by count, skellam (1 query)", median_ms(lambda e: epsilon_of({round_dp_event(e): 1000}, 1e-6),
                                                           lambda: cold(event), 5)),
        ("same, Poisson-sampled skellam", median_ms(lambda e: epsilon_of({round_dp_event(e): 1000}, 1e-6),
                                                    lambda: cold(sampled), 5)),
        ("1000 per-round reports (10 devices)", median_ms(fleet_reports, lambda: cold(event), 3)),
        ("baseline: 1000 per-round compose+eps", median_ms(per_round_calls, lambda: gaussian, 3)),
    ]
    print()
    print(f"{'accountant (target < 1000 ms)':<44}{'median ms':>10}")
    for name, ms in rows:
        print(f"{name:<44}{ms:>10.2f}")


if __name__ == "__main__":
    main()
