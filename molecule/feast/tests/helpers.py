"""Constants and helpers the feast scenario's tests share (the container, test secrets, redis-cli)."""

import pathlib
import sys

# molecule/shared: host_contract, systemd_units.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))

INSTANCE = "molecule-feast"
SERVE_PORT = 6566
# TEST VALUES ONLY, the same as converge.yml's; real deployments take them from ansible-vault.
REDIS_PASSWORD = "molecule-test-redis-password"
REGISTRY_PASSWORD = "molecule-test-registry-password"
REPO = "/var/lib/sovereign/feast/repo"
TEXTFILE = "/var/lib/prometheus/node-exporter/sovereign_feast_materialize.prom"


def redis_cli(host, *args):
    """redis-cli on the host with the password (from the environment, not the command line)."""
    cmd = "REDISCLI_AUTH=%s redis-cli -h 127.0.0.1 --no-auth-warning " + " ".join(["%s"] * len(args))
    return host.run(cmd, REDIS_PASSWORD, *args)
