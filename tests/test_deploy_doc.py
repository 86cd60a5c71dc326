"""docs/deploy-pi.md: every fleetlearn command it shows exists with the options it uses; it links nowhere outside.

Each command line in its code blocks (after ``sudo``/``sudo -u fleetlearn``, with ``\\``
continuations joined) is parsed by the real ``fleetlearn`` argument parser, which exits on an
unknown command or option; every profile it names must load.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from edge_sdk.cli import build_parser
from edge_sdk.config import bundled_profiles, load_profile

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "deploy-pi.md"
FLEETLEARN = re.compile(r"(?:^|[\s=])(?:/opt/fleetlearn/venv/bin/)?fleetlearn\s+"
                        r"((?:aggregator|broker|compile|device|evaluate|plan|simulate|train|--version)\b.*)$")


def commands() -> list[list[str]]:
    found, block, inside = [], "", False
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside or line.lstrip().startswith("#"):
            continue
        block += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line + "\n"
    for line in block.splitlines():
        for part in re.split(r"&&|\|", line):
            match = FLEETLEARN.search(part.split("#")[0])
            if match:
                found.append(shlex.split(match.group(1)))
    return found


def test_the_guide_shows_every_step():
    shown = {" ".join(argv[:2]) for argv in commands()}
    assert {"compile model.onnx", "aggregator key", "device init", "aggregator enrol", "broker certs",
            "broker mosquitto-config", "device run", "device budget", "train bundle"} <= shown, shown


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv[:2]))
def test_every_command_in_the_guide_parses(argv):
    if argv == ["--version"]:
        return
    args = build_parser(argv[0]).parse_args(argv)  # SystemExit on an unknown command or option
    profile = getattr(args, "profile", None)
    if profile is not None and not profile.startswith("/etc/"):
        assert load_profile(profile).name == profile


def test_the_profile_table_matches_the_shipped_profiles():
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| [^|]+ \| (\d+) \| (\d+) MB \| (\d+) / (\d+) \|$", DOC.read_text(), re.M)
    assert sorted(name for name, *_ in rows) == bundled_profiles()
    for name, threads, budget, default, largest in rows:
        p = load_profile(name)
        assert (p.threads, p.runtime.memory_budget_mb, p.training.default_batch_size, p.training.max_batch_size) \
            == (int(threads), int(budget), int(default), int(largest))


def test_the_guide_links_only_inside_the_repository():
    text = DOC.read_text()
    assert not re.search(r"https?://(?!127\.0\.0\.1)", text)
    for target in re.findall(r"\]\(([^)]+)\)", text):
        assert (DOC.parent / target).resolve().is_relative_to(ROOT) and (DOC.parent / target).exists(), target
    for path in re.findall(r"`((?:firmware_configs|edge_sdk)/[^`* ]+)`", text):
        assert (ROOT / path).exists(), path
