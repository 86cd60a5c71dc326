"""The aggregator's side of a round: HostRound (PLAN → TRAIN → SECAGG → AGGREGATE → PUBLISH) and cohorts."""
