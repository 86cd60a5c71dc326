"""Many real ``DeviceAgent``s in one process, one MQTT connection each, all on one ``MqttLoop`` (like the simulator).

    python tests/sharding/device_swarm.py URLS BUNDLE STATE_DIR [STATE_DIR ...]

Each state directory was made by ``round_fleet.make_fleet`` (identity, ledger, data.npz). The agents share
one onnxruntime session and training state; SIGTERM stops them cleanly.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv: list[str]) -> int:
    from edge_sdk.device.agent import AgentSettings, DeviceAgent
    from edge_sdk.device.eligibility import DevicePolicy
    from edge_sdk.device.state_dir import load_provisioning, load_state
    from edge_sdk.training import ModelSession, TrainingState, load_dataset_npz, prepare_dataset
    from edge_sdk.transport.event_loop import MqttLoop
    from edge_sdk.transport.mqtt import MqttSettings, MqttTransport
    from edge_sdk.wire.topics import status_topic

    urls, bundle, directories = argv[0], Path(argv[1]), [Path(a) for a in argv[2:]]
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    loop = MqttLoop()
    session = ModelSession.open(bundle, threads=1)
    training = TrainingState(session)
    policy = DevicePolicy(require_charging=False, min_battery_percent=None, max_cpu_celsius=None,
                          max_load_per_cpu=None)
    agents = []
    for directory in directories:
        device = load_state(directory).device_id
        fleet = load_provisioning(directory).fleet
        mqtt = MqttTransport(MqttSettings(urls, device, status_topic=status_topic(fleet, device)), loop)
        data = prepare_dataset(session.manifest, *load_dataset_npz(directory / "data.npz"))
        agents.append(DeviceAgent(AgentSettings(state_dir=directory, broker_url=urls, bundle=bundle,
                                                data=directory / "data.npz", policy=policy), mqtt,
                                  session=session, training=training, dataset=data))
    while not stop:
        loop.run_once(0.02)
        now = time.monotonic()
        for agent in agents:
            if not agent.idle(now):
                agent.step(0.0)
    for agent in agents:
        agent.close()
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
