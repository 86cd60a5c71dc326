"""The pump's order (effects and their results before any send of the step) and the memory transport."""

from __future__ import annotations

from edge_sdk.protocol.pump import Endpoint, Pump, Step
from edge_sdk.protocol.routing import Send
from edge_sdk.transport.base import Transport
from edge_sdk.transport.memory import (
    MemoryBroker,
    VirtualClock,
    drop_where,
    duplicate_where,
    tamper_where,
    topic_matches,
)


class _Ask:
    pass


class _OrderMachine:
    """Sends one message whose content depends on an effect's result; both come from one step."""

    def handle(self, state, message, now):
        return Step(state)

    def resolve(self, state, effect, result, now):
        return Step({"result": result}, (Send("x", result),))

    def tick(self, state, now):
        if state is None:
            return Step("asked", (Send("x", "before-the-effect?"),), (_Ask(),))
        return Step(state)

    def deadline(self, state):
        return None

    def finished(self, state):
        return True


class _EchoRouter:
    def subscriptions(self):
        return ()

    def outgoing(self, send):
        return f"t/{send.to}", str(send.message).encode(), False


def test_the_pump_runs_effects_and_feeds_results_back_before_it_publishes_any_send_of_the_step():
    events = []
    broker = MemoryBroker()
    broker.publish_hooks.append(lambda sender, topic, payload: events.append(("publish", payload.decode())))
    transport = broker.connect("a")
    endpoint = Endpoint("a", _OrderMachine(), None, transport, _EchoRouter(),
                        {_Ask: lambda effect: events.append(("effect", "")) or "head-on-disk"})
    pump = Pump(VirtualClock(), [endpoint])
    pump.tick()
    assert events == [("effect", ""), ("publish", "before-the-effect?"), ("publish", "head-on-disk")]
    assert endpoint.state == {"result": "head-on-disk"}


def test_memory_transport_is_a_transport_with_mqtt_matching_and_retained_messages():
    broker = MemoryBroker()
    a, b = broker.connect("a"), broker.connect("b")
    assert isinstance(a, Transport)
    a.publish("f/plan", b"retained", retain=True)
    b.subscribe("f/+")
    a.publish("f/x/y", b"deep")
    a.publish("f/z", b"live")
    assert b.poll(0.0) == [("f/plan", b"retained"), ("f/z", b"live")]
    assert topic_matches("f/#", "f/x/y") and not topic_matches("f/+", "f/x/y") and topic_matches("f/+/y", "f/x/y")


def test_memory_faults_drop_duplicate_tamper_and_reorder():
    broker = MemoryBroker(faults=[drop_where(lambda t, p: p == b"lost"), duplicate_where(lambda t, p: p == b"twice"),
                                  tamper_where(lambda t, p: p == b"clean", lambda p: b"dirty")], reorder_seed=3)
    a, b = broker.connect("a"), broker.connect("b")
    b.subscribe("#")
    for payload in (b"lost", b"twice", b"clean", *(bytes([i]) for i in range(20))):
        a.publish("t", payload)
    received = [p for _, p in b.poll(0.0)]
    assert b"lost" not in received and received.count(b"twice") == 2 and b"dirty" in received
    assert [p for p in received if len(p) == 1] != [bytes([i]) for i in range(20)]  # shuffled
    assert broker.stats.dropped == 1


def test_virtual_time_jumps_to_the_next_deadline():
    clock = VirtualClock()
    clock.wait(5.0)
    clock.advance_to(3.0)
    assert clock.now() == 5.0
