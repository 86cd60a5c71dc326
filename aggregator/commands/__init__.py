"""Host-side CLI subcommands; each module is one ``fleetlearn`` subcommand (see edge_sdk.cli)."""
