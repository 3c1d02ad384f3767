"""shared.resources.Resources: the one shape of RAM, CPU and bandwidth in every contract."""

from __future__ import annotations

import pytest

from hangar.project.v1 import project_pb2
from hangar.type.v1 import resources_pb2
from shared.resources import Resources


def test_arithmetic_and_fit_are_per_dimension() -> None:
    pool, used = Resources(1024, 1000, 10), Resources(256, 250, 1)
    assert pool - used == Resources(768, 750, 9)
    assert used + used == Resources(512, 500, 2)
    assert used.fits_in(pool) and not pool.fits_in(used)
    assert not Resources(256, 250, 11).fits_in(pool)  # one dimension is enough to refuse
    assert dict(pool.items()) == {"ram_mb": 1024, "cpu_millis": 1000, "bandwidth_gb": 10}


def test_compute_drops_bandwidth_which_no_server_holds() -> None:
    assert Resources(256, 250, 5).compute == Resources(256, 250)
    assert Resources(256, 250).compute == Resources(256, 250)


def test_the_proto_round_trips_and_every_contract_uses_the_one_message() -> None:
    value = Resources(512, 500, 3)
    assert Resources.from_proto(value.to_proto()) == value
    assert value.to_proto() == resources_pb2.Resources(ram_mb=512, cpu_millis=500, bandwidth_gb=3)
    field = project_pb2.Project.DESCRIPTOR.fields_by_name["resources"]
    assert field.message_type is resources_pb2.Resources.DESCRIPTOR


def test_from_row_reads_prefixed_and_suffixed_columns() -> None:
    row = {
        "pool_ram_mb": 1024,
        "pool_cpu_millis": 1000,
        "pool_bandwidth_gb": 10,
        "ram_mb_reserved": 64,
        "cpu_millis_reserved": 50,
    }
    assert Resources.from_row(row, prefix="pool_") == Resources(1024, 1000, 10)
    assert Resources.from_row(row, suffix="_reserved") == Resources(64, 50)  # no bandwidth column
    with pytest.raises(KeyError):
        Resources.from_row(row)  # a query that forgot the columns is an error, not zeros
