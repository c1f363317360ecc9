"""The indicator computation (`ta` plus the stability mask) against TA-Lib, the textbook reference.

Pure computation: no database. Tolerances are the promise of apps/marketdata/indicators.py: 1e-8
relative to the close for price-like values, 1e-8 points for RSI.
"""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import talib
from backtesting.test import BTCUSD, EURUSD, GOOG
from ta.momentum import RSIIndicator
from ta.trend import MACD, EMAIndicator, SMAIndicator
from ta.volatility import BollingerBands

from apps.marketdata.indicators import IndicatorSet, _held_rsi, bollinger_columns, macd_columns
from datacollector.config import BollingerConfig, ConfigError, IndicatorConfig, MacdConfig

DEFAULT = IndicatorSet(IndicatorConfig())
CUSTOM = IndicatorSet(
    IndicatorConfig(
        rsi=(7, 21),
        ema=(5, 100),
        sma=(3,),
        macd=(MacdConfig(), MacdConfig(fast=5, slow=35, signal=5)),
        bollinger=(BollingerConfig(period=10, std=1.5), BollingerConfig()),
    )
)


def random_walk(n: int = 5_000, seed: int = 7, start: float = 30_000.0, sigma: float = 0.01) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return start * np.exp(np.cumsum(rng.normal(0.0, sigma, n)))


def talib_reference(close: np.ndarray, config: IndicatorConfig) -> dict[str, np.ndarray]:
    """TA-Lib's value of every column, with RSI's 0/0 (no gain, no loss) read as our convention, 50."""
    ref: dict[str, np.ndarray] = {}
    for n in config.sma:
        ref[f"sma_{n}"] = talib.SMA(close, n)
    for n in config.ema:
        ref[f"ema_{n}"] = talib.EMA(close, n)
    for n in config.rsi:
        rsi = talib.RSI(close, n)
        changes = np.r_[0, np.cumsum(np.diff(close) != 0)]
        rsi[(changes == 0) & ~np.isnan(rsi)] = 50.0
        ref[f"rsi_{n}"] = rsi
    for macd in config.macd:
        names = macd_columns(macd)
        for name, values in zip(names, talib.MACD(close, macd.fast, macd.slow, macd.signal), strict=True):
            ref[name] = values
    for bb in config.bollinger:
        upper, middle, lower = talib.BBANDS(close, bb.period, bb.std, bb.std)
        for name, values in zip(bollinger_columns(bb), (upper, middle, lower), strict=True):
            ref[name] = values
    return ref


def errors(name: str, values: np.ndarray, reference: np.ndarray, close: np.ndarray) -> np.ndarray:
    scale = 1.0 if name.startswith("rsi") else np.abs(close)
    return np.abs(values - reference) / scale


def assert_matches_talib(indicators: IndicatorSet, close: np.ndarray) -> dict[str, int]:
    """Every stored value within 1e-8 of TA-Lib; returns the first stored index per column."""
    computed = indicators.compute(close)
    reference = talib_reference(close, indicators.config)
    assert list(computed) == indicators.names
    first_stored = {}
    for name, values in computed.items():
        stored = ~np.isnan(values)
        assert not (stored & np.isnan(reference[name])).any(), f"{name}: value where TA-Lib has none"
        worst = errors(name, values, reference[name], close)[stored].max(initial=0.0)
        assert worst < 1e-8, f"{name}: stored value differs from TA-Lib by {worst:.3g}"
        # Null only as a prefix: once stable, a column stays stable.
        first = int(np.argmax(stored)) if stored.any() else len(close)
        assert stored[first:].all(), f"{name}: a null after the first stored value"
        first_stored[name] = first
    return first_stored


def unmasked(indicators: IndicatorSet) -> IndicatorSet:
    """The same indicators with no stability mask: `ta`'s raw output."""
    raw = tuple(dataclasses.replace(c, stable_from=0, changes=0) for c in indicators.columns)
    plain = IndicatorSet(indicators.config)
    plain.__dict__["columns"] = raw  # overrides the cached property
    return plain


def test_default_columns_are_named_as_the_api_documents():
    assert DEFAULT.names == [
        "sma_20",
        "sma_50",
        "sma_200",
        "ema_12",
        "ema_26",
        "ema_50",
        "rsi_14",
        "macd",
        "macd_signal",
        "macd_hist",
        "bb_upper",
        "bb_middle",
        "bb_lower",
    ]


def test_non_default_macd_and_bollinger_columns_carry_their_parameters():
    assert CUSTOM.names == [
        "sma_3",
        "ema_5",
        "ema_100",
        "rsi_7",
        "rsi_21",
        "macd",
        "macd_signal",
        "macd_hist",
        "macd_5_35_5",
        "macd_signal_5_35_5",
        "macd_hist_5_35_5",
        "bb_upper_10_1p5",
        "bb_middle_10_1p5",
        "bb_lower_10_1p5",
        "bb_upper",
        "bb_middle",
        "bb_lower",
    ]
    assert bollinger_columns(BollingerConfig(period=20, std=3)) == ("bb_upper_20_3", "bb_middle_20_3", "bb_lower_20_3")


def test_duplicate_periods_give_one_column():
    assert IndicatorSet(IndicatorConfig(sma=(20, 20), ema=(), rsi=(), macd=(), bollinger=())).names == ["sma_20"]


def test_stable_from_follows_the_documented_horizons():
    stable = {c.name: c for c in DEFAULT.columns}
    # SMA and Bollinger: the first full window.
    assert stable["sma_200"].stable_from == 199
    assert stable["bb_upper"].stable_from == 19
    # EMA and MACD: a little over 10x the period; RSI about 30x, counted in price changes.
    for period in (12, 26, 50):
        assert 10 * period < stable[f"ema_{period}"].stable_from < 15 * period
    assert 10 * 26 < stable["macd"].stable_from <= stable["macd_signal"].stable_from < 17 * 26
    assert stable["macd_hist"].stable_from == stable["macd_signal"].stable_from
    assert stable["rsi_14"].stable_from == 14
    assert 28 * 14 < stable["rsi_14"].changes < 33 * 14
    assert DEFAULT.warmup == stable["ema_50"].stable_from


@pytest.mark.parametrize("indicators", [DEFAULT, CUSTOM], ids=["default", "custom"])
def test_long_random_walk_equals_talib_wherever_stored(indicators):
    close = random_walk()
    first_stored = assert_matches_talib(indicators, close)
    for column in indicators.columns:
        # In a random walk every candle moves, so the RSI's count of changes is its count of candles.
        assert first_stored[column.name] == column.stable_from + column.changes


@pytest.mark.parametrize(("label", "frame"), [("GOOG daily", GOOG), ("EURUSD hourly", EURUSD)], ids=["goog", "eurusd"])
def test_real_prices_equal_talib_wherever_stored(label, frame):
    close = frame["Close"].to_numpy(dtype=float)
    first_stored = assert_matches_talib(DEFAULT, close)
    assert max(first_stored.values()) < len(close), label


def test_short_real_series_stores_only_what_is_stable():
    close = BTCUSD["Close"].to_numpy(dtype=float)  # 156 monthly candles: shorter than any EMA horizon
    first_stored = assert_matches_talib(DEFAULT, close)
    assert first_stored["sma_20"] == 19
    assert first_stored["bb_middle"] == 19
    for name in ("sma_200", "ema_12", "ema_50", "rsi_14", "macd", "macd_signal"):
        assert first_stored[name] == len(close), name


def test_raw_ta_differs_from_talib_before_the_horizon_and_the_mask_is_not_wildly_conservative():
    close = random_walk(seed=11)
    raw = unmasked(DEFAULT).compute(close)
    reference = talib_reference(close, DEFAULT.config)
    for column in DEFAULT.columns:
        err = errors(column.name, raw[column.name], reference[column.name], close)
        off = np.flatnonzero(~(err < 1e-8) & ~np.isnan(reference[column.name]))
        empirical = int(off[-1]) + 1 if len(off) else 0
        ours = column.stable_from + column.changes
        if column.name.startswith(("sma", "bb")):
            assert empirical == 0  # ta and the textbook agree from the first full window
            assert ours == int(np.argmax(~np.isnan(reference[column.name])))
        else:
            # ta's seed really is off for a while (this is what the mask is for) ...
            assert empirical > 50, column.name
            # ... and the analytic horizon stays within a small factor of where it actually converges.
            assert empirical <= ours <= 2.5 * empirical, (column.name, empirical, ours)


def test_constant_prices_give_defined_values():
    close = np.full(2_000, 123.45)
    values = DEFAULT.compute(close)
    for name in ("sma_20", "sma_200", "ema_12", "ema_50", "bb_upper", "bb_middle", "bb_lower"):
        stored = values[name][~np.isnan(values[name])]
        assert len(stored), name
        assert np.allclose(stored, 123.45, rtol=0, atol=1e-9), name
    for name in ("macd", "macd_signal", "macd_hist"):
        stored = values[name][~np.isnan(values[name])]
        assert len(stored), name
        assert np.abs(stored).max() < 1e-9, name
    # No gain and no loss since the start: 50 by convention, stored from the first RSI (exact seed).
    rsi = values["rsi_14"]
    assert np.isnan(rsi[:14]).all()
    assert (rsi[14:] == 50.0).all()


def test_series_that_starts_flat_has_an_exact_rsi_seed():
    close = np.r_[np.full(300, 50.0), random_walk(n=1_000, start=50.0)]
    first_stored = assert_matches_talib(DEFAULT, close)
    assert first_stored["rsi_14"] == 14


def test_flat_stretch_holds_rsi_and_bands_collapse_to_the_price():
    close = np.r_[random_walk(n=1_500), np.full(3_000, 31_000.0), random_walk(n=1_000, seed=3, start=31_000.0)]
    values = DEFAULT.compute(close)
    assert_matches_talib(DEFAULT, close)
    rsi = values["rsi_14"]
    assert np.all(rsi[1_500:4_500] == rsi[1_500])
    for name in ("bb_upper", "bb_lower"):
        assert values[name][1_600] == 31_000.0


def test_rsi_survives_a_flat_stretch_long_enough_to_underflow_wilders_averages():
    # After ~10,000 flat candles both averages underflow to zero; ta would jump to 100 (TA-Lib to 50),
    # but the RSI of a flat market is still the one it had when it went flat.
    close = np.r_[random_walk(n=1_000), np.full(12_000, 30_000.0)]
    rsi = DEFAULT.compute(close)["rsi_14"]
    # Candle 1,000 is the move onto the flat price; from there nothing moves.
    assert not np.isnan(rsi[1_000])
    assert np.all(rsi[1_000:] == rsi[1_000])


def test_rsi_waits_for_price_changes_not_candles_after_its_seed():
    # A seed with moves, then a long flat stretch: ta's seed error does not decay while nothing moves.
    close = np.r_[random_walk(n=30), np.full(2_000, 29_000.0), random_walk(n=1_000, seed=5, start=29_000.0)]
    first_stored = assert_matches_talib(DEFAULT, close)
    rsi_14 = next(c for c in DEFAULT.columns if c.name == "rsi_14")
    # Candles 15..29 move, 30 moves onto the flat price, 31..2029 do not move, every one from 2030 does.
    changes_before_flat = 16
    assert first_stored["rsi_14"] == 2_030 + (rsi_14.changes - changes_before_flat) - 1


def test_window_restarted_after_the_warmup_equals_the_full_computation():
    close = random_walk(n=6_000, seed=2)
    full = DEFAULT.compute(close)
    start = 3_000 - DEFAULT.warmup
    window = DEFAULT.compute(close[start:], at_series_start=False)
    for name in DEFAULT.names:
        part = window[name][DEFAULT.warmup :]
        assert not np.isnan(part).any(), name
        err = errors(name, part, full[name][3_000:], close[3_000:])
        assert err.max() < 1e-9, (name, err.max())


def test_window_starting_flat_does_not_claim_an_exact_rsi_seed():
    close = np.r_[random_walk(n=2_000), np.full(100, 30_500.0), random_walk(n=300, start=30_500.0)]
    # From the series start, a flat beginning means a zero seed, exact; mid-series it hides the state.
    assert not np.isnan(DEFAULT.compute(close[2_000:], at_series_start=True)["rsi_14"][14:]).any()
    assert np.isnan(DEFAULT.compute(close[2_000:], at_series_start=False)["rsi_14"]).all()


def test_too_short_series_is_all_null():
    values = DEFAULT.compute(np.array([1.0, 2.0, 3.0]))
    assert all(np.isnan(column).all() for column in values.values())
    assert all(len(column) == 0 for column in DEFAULT.compute(np.array([])).values())


def test_a_period_below_one_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"indicators\.ema\[1\]: must be greater than 0, got 0"):
        IndicatorSet(IndicatorConfig(ema=(12, 0)))


def ta_output(close: np.ndarray, config: IndicatorConfig) -> dict[str, np.ndarray]:
    """Every column as `ta`'s indicator objects compute it (RSI held over flat candles, as stored)."""
    series = pd.Series(close)
    changes = np.r_[0, np.cumsum(np.diff(close) != 0)]
    out: dict[str, np.ndarray] = {}
    for n in config.sma:
        out[f"sma_{n}"] = SMAIndicator(series, window=n).sma_indicator().to_numpy()
    for n in config.ema:
        out[f"ema_{n}"] = EMAIndicator(series, window=n).ema_indicator().to_numpy()
    for n in config.rsi:
        out[f"rsi_{n}"] = _held_rsi(RSIIndicator(series, window=n).rsi().to_numpy(), changes, n)
    for macd in config.macd:
        indicator = MACD(series, window_slow=macd.slow, window_fast=macd.fast, window_sign=macd.signal)
        values = (indicator.macd(), indicator.macd_signal(), indicator.macd_diff())
        for name, column in zip(macd_columns(macd), values, strict=True):
            out[name] = column.to_numpy()
    for bb in config.bollinger:
        indicator = BollingerBands(series, window=bb.period, window_dev=bb.std)
        values = (indicator.bollinger_hband(), indicator.bollinger_mavg(), indicator.bollinger_lband())
        for name, column in zip(bollinger_columns(bb), values, strict=True):
            out[name] = column.to_numpy()
    return out


def with_flat_stretches(close: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    close = close.copy()
    for start in rng.integers(0, len(close) - 1, 40):
        close[start : start + rng.integers(1, 60)] = close[start]
    return close


@pytest.mark.parametrize(
    "indicators",
    [
        DEFAULT,
        CUSTOM,
        IndicatorSet(IndicatorConfig(rsi=(2,), ema=(2,), sma=(1, 2))),
        IndicatorSet(IndicatorConfig(rsi=(1,), ema=(1,), sma=(), macd=(), bollinger=())),
    ],
)
@pytest.mark.parametrize(
    "close",
    [
        random_walk(6_000, seed=3),
        with_flat_stretches(random_walk(6_000, seed=4, start=0.0004, sigma=0.03), seed=5),
        np.r_[np.full(30, 50.0), random_walk(3_000, seed=6, start=50.0)],
        np.full(500, 7.0),
        random_walk(10, seed=8),
    ],
    ids=["walk", "tiny prices, flat stretches", "starts flat", "constant", "short"],
)
def test_raw_values_are_bit_for_bit_what_ta_computes(indicators, close):
    # The computation calls pandas' window operations directly instead of `ta`'s indicator objects
    # (which build ~40 Series per update): the values must not move by a single bit.
    computed = unmasked(indicators).compute(close)
    reference = ta_output(close, indicators.config)
    for name in indicators.names:
        np.testing.assert_array_equal(computed[name], reference[name], err_msg=name)
