import pytest

from tmcore import InvalidConfigError, ScheduleClampWarning, parse_r
from tmcore.schedule import clamped_r, token_counts


def test_int_list_and_ramp():
    assert parse_r(4, 3) == [3, 3, 3, 3]
    assert parse_r(5, [4, 2]) == [4, 2, 0, 0, 0]
    assert parse_r(12, (16, -1)) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert parse_r(12, (16, 0.0)) == [16] * 12
    assert parse_r(3, (10, 1)) == [0, 10, 20]
    assert parse_r(1, 7) == [7]  # the original divides by zero here


def test_list_longer_than_model_is_an_error():
    with pytest.raises(
        InvalidConfigError, match=r"r=\[1, 2, 3\] has 3 entries for a model with 2 blocks; .*at most 2 entries"
    ):
        parse_r(2, [1, 2, 3])


@pytest.mark.parametrize(
    "r, tokens, blocks, expected",
    [
        (13, 197, 12, [197, 184, 171, 158, 145, 132, 119, 106, 93, 80, 67, 54, 41]),
        (16, 197, 12, [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]),
        ((16, -1), 197, 12, [197, 165, 136, 110, 87, 67, 50, 36, 25, 17, 12, 10, 10]),
    ],
)
def test_token_counts_of_algorithms_1_8(r, tokens, blocks, expected):
    with pytest.warns(ScheduleClampWarning) if r == 16 else _no_warning():
        assert token_counts(clamped_r(parse_r(blocks, r), tokens, 1), tokens) == expected


def test_vit_l_384_r25_counts():
    with pytest.warns(ScheduleClampWarning, match="block 22: r=25 -> 13"):
        counts = token_counts(clamped_r(parse_r(24, 25), 577, 1), 577)
    assert (counts[8], counts[16], counts[22], counts[-1]) == (377, 177, 27, 8)


def test_clamp_warns_with_the_blocks_it_capped():
    with pytest.warns(ScheduleClampWarning, match=r"block 11: r=16 -> 10"):
        clamped_r([16] * 12, 197, 1)


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", ScheduleClampWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)
