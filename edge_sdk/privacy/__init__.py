"""Update encoding, integer DP noise and the device privacy ledger."""
