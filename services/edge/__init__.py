"""The edge: the public HTTP(S) entry for apps, a Caddy driven from runtime's route table."""
