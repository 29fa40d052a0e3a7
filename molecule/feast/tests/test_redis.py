"""The REAL Redis (Debian's redis-server) and its exporter in the molecule container, as roles/redis left them."""

from helpers import redis_cli
from host_contract import read_contract


def test_config_is_private(host):
    conf = host.file("/etc/redis/redis.conf")
    assert (conf.user, conf.group, conf.mode) == ("root", "redis", 0o640)
    env = host.file("/etc/default/prometheus-redis-exporter")
    assert (env.user, env.group, env.mode) == ("root", "root", 0o600)


def test_listens_on_internal_address_and_localhost_only(host, container_ip):
    listening = host.run("ss -Hltn 'sport = :6379'").stdout
    assert f"{container_ip}:6379" in listening
    assert "127.0.0.1:6379" in listening
    assert "0.0.0.0:6379" not in listening and "*:6379" not in listening


def test_password_is_required(host):
    out = host.run("redis-cli -h 127.0.0.1 ping")
    assert "NOAUTH" in out.stdout + out.stderr
    assert redis_cli(host, "ping").stdout.strip() == "PONG"


def test_settings_in_force(host):
    def get(name):
        lines = redis_cli(host, "config", "get", name).stdout.split()
        return lines[1] if len(lines) > 1 else ""

    assert get("protected-mode") == "yes"
    assert get("appendonly") == "yes"
    assert get("appendfsync") == "everysec"
    assert get("maxmemory") == str(128 * 1024 * 1024)
    assert get("maxmemory-policy") == "noeviction"
    assert get("save") == ""


def test_unit_hardening_in_force(host):
    props = host.run("systemctl show redis-server -p ReadWritePaths -p UMask -p ActiveState").stdout
    assert "ActiveState=active" in props
    assert "/etc/redis" not in props.split("ReadWritePaths=", 1)[1].splitlines()[0]


def test_exporter_sees_redis(host, container_ip):
    metrics = host.run("curl -fsS http://%s:9121/metrics", container_ip)
    assert metrics.rc == 0, metrics.stderr
    assert "\nredis_up 1" in metrics.stdout
    # The password is in the environment file, never on the command line.
    assert "molecule-test" not in host.run("ps -eo args").stdout


def test_contract_publishes_redis_and_its_exporter(host, container_ip):
    contract = read_contract(host)
    assert contract["redis"]["address"] == "127.0.0.1"
    assert contract["redis"]["port"] == 6379
    endpoint = contract["metrics"]["redis"]
    assert (endpoint["job"], endpoint["address"], endpoint["port"], endpoint["published_by"]) == (
        "redis",
        container_ip,
        9121,
        "redis",
    )
