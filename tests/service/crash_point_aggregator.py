"""``fleetlearn aggregator serve`` that SIGKILLs itself at one exact point: the crash matrix's aggregator.

Usage: ``python crash_point_aggregator.py ROUND:POINT fleetlearn-args...``. POINT is a stage the
service logs ("entered stage X": PLAN, TRAIN, SHARE_KEYS, MASKED_INPUT, CONSISTENCY_CHECK,
UNMASK), ``ACCOUNTING`` (inside the open accounting transaction, before it commits) or
``ACCOUNTED`` (right after accounting and the new model committed, before the model is
published). ``-`` as ROUND:POINT never crashes.

Why a self-inflicted SIGKILL rather than one sent by the test on reading the log line: SHARE_KEYS
to UNMASK last milliseconds with five devices, so a signal from outside lands in whichever stage
the round has reached by then, and the moment between accounting and publishing is microseconds.
The kill is a real SIGKILL of a real process (no ``finally``, no atexit, no flush); only its moment
is chosen here. Nothing else of the service is replaced.
"""

from __future__ import annotations

import os
import signal
import sys


def die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(round_index: int, point: str) -> None:
    from aggregator.service import host_effects, service

    if point == "ACCOUNTING":
        account = host_effects.HostEffectHandlers.account

        def account_then_die_inside(self, effect):
            if host_effects.round_index_of(effect.round_id) != round_index:
                return account(self, effect)
            store = self.store
            add = store.add_accounting_event

            def add_then_die(*args, **kwargs):
                add(*args, **kwargs)  # written inside the open transaction, not committed
                die()

            store.add_accounting_event = add_then_die
            return account(self, effect)

        host_effects.HostEffectHandlers.account = account_then_die_inside
        return
    if point == "ACCOUNTED":
        account_with_model = service.AggregatorService._account_with_model

        def account_then_die(self, effect):
            report = account_with_model(self, effect)
            if host_effects.round_index_of(effect.round_id) == round_index:
                die()
            return report

        service.AggregatorService._account_with_model = account_then_die
        return
    observe = service._StageWatcher.observe

    def observe_then_die(self, state):
        observe(self, state)
        if state.plan.round_index == round_index and self.last == point:
            die()

    service._StageWatcher.observe = observe_then_die


def main(argv: list[str]) -> int:
    where, *args = argv
    if where != "-":
        round_text, point = where.split(":")
        arm(int(round_text), point)
    from edge_sdk.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
