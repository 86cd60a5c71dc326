"""Host-side CLI subcommands; each module is one ``fleetlearn`` subcommand (see aggregator.cli)."""
