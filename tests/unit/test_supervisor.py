"""How `jetsource up` hands out metrics ports to its roles."""

from __future__ import annotations

from infra.settings import Settings
from infra.supervisor import metrics_ports, role_commands


def test_roles_get_consecutive_metrics_ports_and_the_edge_none_of_them() -> None:
    settings = Settings(_env_file=None, metrics_port=9400)
    children = role_commands(settings)
    assert metrics_ports(children) == {"actor orders": 9400, "actor tasks": 9401, "worker": 9402, "projector": 9403}
    edge = next(c for c in children if c.name == "edge")
    assert edge.env["JETSOURCE_METRICS_PORT"] == "0"  # it serves /metrics on the HTTP port


def test_no_metrics_ports_unless_asked_even_when_the_environment_has_one() -> None:
    settings = Settings(_env_file=None, metrics_port=0)
    assert metrics_ports(role_commands(settings)) == {}
    assert all(c.env["JETSOURCE_METRICS_PORT"] == "0" for c in role_commands(settings))
