"""The broker side of a deployment: ``mosquitto_config`` writes Mosquitto's listener, passwords and ACL."""
