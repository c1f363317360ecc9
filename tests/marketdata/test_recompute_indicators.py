"""manage.py recompute_indicators: rebuilds after a config change, selects series, names bad arguments."""

from io import StringIO

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from apps.marketdata import store
from apps.marketdata.indicators import indicator_set, update_indicators
from apps.marketdata.store import read_indicators
from datacollector.config import get_config
from tests.marketdata.test_indicators import random_walk

T0 = 1_699_999_980_000
MINUTE = 60_000


def put_series(symbol: str, timeframe: str, n: int, seed: int = 1) -> None:
    step = {"1m": MINUTE, "1h": 60 * MINUTE}[timeframe]
    rows = [[T0 + i * step, c, c, c, c, 1.0] for i, c in enumerate(random_walk(n=n, seed=seed).tolist())]
    store.upsert_candles("simulated", symbol, timeframe, rows)


def use_config(settings, tmp_path, indicators_yaml: str) -> None:
    path = tmp_path / "collector.yaml"
    path.write_text("rate_limits:\n  default: {weight_per_minute: 1200, burst: 20}\n" + indicators_yaml)
    settings.COLLECTOR_CONFIG = path
    get_config.cache_clear()


@pytest.fixture(autouse=True)
def fresh_config():
    get_config.cache_clear()
    yield
    get_config.cache_clear()


def run(*args: str) -> str:
    out = StringIO()
    call_command("recompute_indicators", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def test_rebuild_after_a_config_change_has_exactly_the_new_columns(sql_store, settings, tmp_path):
    use_config(settings, tmp_path, "indicators:\n  rsi: [3]\n  ema: [4]\n  sma: [3]\n  macd: []\n  bollinger: []\n")
    put_series("BTC/USDT", "1m", 120)
    update_indicators("simulated", "BTC/USDT", "1m", T0)
    assert set(read_indicators("simulated", "BTC/USDT", "1m")[-1][1]) == {"rsi_3", "ema_4", "sma_3"}

    use_config(
        settings,
        tmp_path,
        "indicators:\n  rsi: []\n  ema: []\n  sma: [5, 10]\n  macd: []\n  bollinger: [{period: 10, std: 1.5}]\n",
    )
    output = run("--exchange", "simulated")
    rows = read_indicators("simulated", "BTC/USDT", "1m")
    columns = ["sma_5", "sma_10", "bb_upper_10_1p5", "bb_middle_10_1p5", "bb_lower_10_1p5"]
    assert len(rows) == 120
    assert all(sorted(values) == sorted(columns) for _, values in rows)
    close = np.array([row[4] for row in store.read_candles("simulated", "BTC/USDT", "1m")])
    assert rows[-1][1]["sma_10"] == pytest.approx(close[-10:].mean(), rel=1e-12)
    assert "Recomputed 1 series (120 rows)" in output
    assert "sma_5, sma_10, bb_upper_10_1p5" in output


def test_symbol_and_timeframe_select_the_series(sql_store):
    put_series("BTC/USDT", "1m", 30)
    put_series("BTC/USDT", "1h", 30)
    put_series("ETH/USDT", "1m", 30)
    output = run("--exchange", "simulated", "--symbol", "BTC/USDT", "--timeframe", "1h")
    assert "Recomputed 1 series (30 rows)" in output
    assert len(read_indicators("simulated", "BTC/USDT", "1h")) == 30
    assert read_indicators("simulated", "BTC/USDT", "1m") == []
    assert read_indicators("simulated", "ETH/USDT", "1m") == []
    assert "Recomputed 2 series (60 rows)" in run(
        "--exchange", "simulated", "--symbol", "BTC/USDT,ETH/USDT,", "--timeframe", "1m"
    )


def test_every_stored_series_of_the_exchange_by_default(sql_store):
    put_series("BTC/USDT", "1m", 20)
    put_series("ETH/USDT", "1h", 20)
    assert "Recomputed 2 series (40 rows)" in run("--exchange", "simulated")
    assert indicator_set().names[0] in read_indicators("simulated", "ETH/USDT", "1h")[0][1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--exchange", "nosuchexchange"], "--exchange 'nosuchexchange' is not a ccxt exchange id"),
        (["--exchange", "binance"], "--exchange 'binance' has no stored candles"),
        (["--exchange", "simulated", "--symbol", "DOGE/USDT"], "--symbol DOGE/USDT: no stored candles on simulated"),
        (["--exchange", "simulated", "--timeframe", "5m"], "--timeframe 5m: no stored candles on simulated"),
        (["--exchange", "simulated", "--timeframe", "fast"], "--timeframe fast: Timeframe 'fast' is not well formed"),
        (
            ["--exchange", "simulated", "--symbol", "ETH/USDT", "--timeframe", "1m"],
            "--symbol and --timeframe select no stored series",
        ),
    ],
)
def test_bad_arguments_are_named(sql_store, args, message):
    put_series("BTC/USDT", "1m", 5)
    put_series("ETH/USDT", "1h", 5)
    with pytest.raises(CommandError, match=message.replace("/", "/").replace("(", r"\(")):
        run(*args)


def test_exchange_is_required(sql_store):
    with pytest.raises(CommandError, match="--exchange"):
        run()


def test_a_bad_config_file_is_a_command_error(sql_store, settings, tmp_path):
    use_config(settings, tmp_path, "indicators:\n  rsi: [0]\n")
    with pytest.raises(CommandError, match=r"indicators\.rsi\[0\]: must be greater than 0"):
        run("--exchange", "simulated")
