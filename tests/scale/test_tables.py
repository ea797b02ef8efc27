"""What `plan` prints and refuses (soft_jax.scale.tables): the programs' memory table, the decode bounds table, and
the one-line refusal of the largest program over a device, with what to change."""

import pytest

from soft_jax.core.errors import UserError
from soft_jax.scale import tables
from soft_jax.scale.plan import DecodeBound, GiB, Program


def program(name, temporaries, refused=""):
    return Program(name, "8 rows", arguments=2 * GiB, outputs=GiB, aliased=GiB, temporaries=temporaries,
                   code=0, resident=GiB, compile_s=1.25, refused=refused)


def test_the_programs_table_sums_each_program_against_the_device():
    rows = tables.programs_table([program("train_step", 3 * GiB), program("decode", 20 * GiB, "out of memory")],
                                 device_bytes=16 * GiB).splitlines()
    assert rows[0].startswith("| program | compiled for | arguments |") and len(rows) == 4
    # total = arguments + outputs - donated + temporaries + code + resident; not compiled: no collectives
    assert rows[2] == ("| train_step | 8 rows | 2.00 | 1.00 | 1.00 | 3.00 | 0.00 | 1.00 | 6.00 | - | - | yes | 1.2 |")
    assert rows[3].endswith("| 23.00 | - | - | **no** (refused by the compiler) | 1.2 |")
    assert "| - | 1.2 |" in tables.programs_table([program("score", GiB)], device_bytes=None)  # CPU: unknown


def test_the_largest_program_over_the_device_is_refused_in_one_line_with_its_remedy():
    tables.refuse_over([program("train_step", 3 * GiB)], 16 * GiB)  # fits: nothing
    tables.refuse_over([program("train_step", 300 * GiB)], None)  # memory unknown: nothing compared
    with pytest.raises(UserError) as e:
        tables.refuse_over([program("train_step", 14 * GiB), program("decode", 20 * GiB)], 16 * GiB)  # both over
    message = str(e.value)
    assert "\n" not in message and message.startswith("decode needs 23.00 GiB per device (compiled), more than the "
                                                      "16.00 GiB a device has; ")
    assert message.endswith(tables.REMEDIES["decode"]) and set(tables.REMEDIES) >= {
        "train_step", "prefix_prefill", "prefill", "decode", "score"}


def test_the_bounds_table_shows_what_a_decode_step_reads_and_its_bound():
    b = DecodeBound(weights_read=803 * 2**20, cache_read=4633 * 2**20, flops=2.5e9, collectives=0.0, step_s=0.0125,
                    limited_by="HBM", tokens_per_s_per_chip=1149.4, reshard_s=None)
    rows = tables.bounds_table([("generation mesh (4, 1, 16)", b)]).splitlines()
    assert rows[2] == "| generation mesh (4, 1, 16) | 803 | 4,633 | 2.5 | 0 | 12.50 | HBM | 1,149 | - |"
