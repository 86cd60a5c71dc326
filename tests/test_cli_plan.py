"""``fleetlearn plan`` joins SecAgg+ parameter choice and DP calibration, and names bad parameters."""

import json

from edge_sdk.cli import main

BASE = ["plan", "--delta", "1e-6", "--cohort", "100", "--population", "10000", "--rounds", "50", "--dim", "4096"]


def test_plan_reports_reference_secagg_parameters_and_meets_the_epsilon(capsys):
    assert main([*BASE, "--epsilon", "4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["secagg"]["degree_k"], plan["secagg"]["threshold_t"]) == (12, 7)  # active-secure default: 2t > k + 1
    assert 0 < plan["privacy"]["epsilon"] <= 4.0
    assert plan["privacy"]["t_honest"] == 90
    assert plan["privacy"]["wrap_probability"] <= 1e-4


def test_plan_rejects_a_nonpositive_epsilon_naming_it(capsys):
    assert main([*BASE, "--epsilon", "0"]) == 2
    assert "epsilon" in capsys.readouterr().err


def test_plan_rejects_too_few_bits(capsys):
    assert main([*BASE, "--epsilon", "4", "--bits", "4"]) == 2
    assert "bits" in capsys.readouterr().err
