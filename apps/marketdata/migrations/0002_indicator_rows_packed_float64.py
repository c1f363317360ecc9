"""Indicator rows: JSON values become packed float64 (`columns` + `data`) keyed by a composite primary key.

Existing rows are converted, not dropped: on PostgreSQL in one INSERT ... SELECT (jsonb_each in stored
key order, float8send is the big-endian packing the model uses), elsewhere in Python. The conversion
is reversible. `manage.py recompute_indicators` would rebuild the same rows from the candles.
"""

import struct

from django.db import migrations, models

BATCH = 2_000


def pack_json_rows(apps, schema_editor) -> None:
    old = apps.get_model("marketdata", "JsonIndicatorRow")
    new = apps.get_model("marketdata", "IndicatorRow")
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f"""
            INSERT INTO {new._meta.db_table} (exchange_id, symbol, timeframe, ts, columns, data)
            SELECT o.exchange_id, o.symbol, o.timeframe, o.ts, coalesce(v.columns, ''), coalesce(v.data, ''::bytea)
            FROM {old._meta.db_table} AS o
            CROSS JOIN LATERAL (
                SELECT string_agg(e.key, ',' ORDER BY e.n) AS columns,
                       string_agg(
                           float8send(CASE WHEN jsonb_typeof(e.value) = 'number' THEN e.value::float8 ELSE 'NaN' END),
                           ''::bytea ORDER BY e.n
                       ) AS data
                FROM jsonb_each(o."values") WITH ORDINALITY AS e(key, value, n)
            ) AS v
            """
        )
        return
    batch = []
    for exchange_id, symbol, timeframe, ts, values in old.objects.values_list(
        "exchange_id", "symbol", "timeframe", "ts", "values"
    ).iterator(chunk_size=BATCH):
        numbers = [float("nan") if value is None else float(value) for value in values.values()]
        batch.append(
            new(
                exchange_id=exchange_id,
                symbol=symbol,
                timeframe=timeframe,
                ts=ts,
                columns=",".join(values),
                data=struct.pack(f">{len(numbers)}d", *numbers),
            )
        )
        if len(batch) == BATCH:
            new.objects.bulk_create(batch)
            batch = []
    new.objects.bulk_create(batch)


def unpack_to_json_rows(apps, schema_editor) -> None:
    old = apps.get_model("marketdata", "JsonIndicatorRow")
    new = apps.get_model("marketdata", "IndicatorRow")
    batch = []
    for exchange_id, symbol, timeframe, ts, columns, data in new.objects.values_list(
        "exchange_id", "symbol", "timeframe", "ts", "columns", "data"
    ).iterator(chunk_size=BATCH):
        names = columns.split(",") if columns else []
        numbers = struct.unpack(f">{len(names)}d", data)
        values = {name: None if value != value else value for name, value in zip(names, numbers, strict=True)}
        batch.append(old(exchange_id=exchange_id, symbol=symbol, timeframe=timeframe, ts=ts, values=values))
        if len(batch) == BATCH:
            old.objects.bulk_create(batch)
            batch = []
    old.objects.bulk_create(batch)


class Migration(migrations.Migration):
    dependencies = [
        ("marketdata", "0001_initial"),
    ]

    operations = [
        migrations.RenameModel("IndicatorRow", "JsonIndicatorRow"),
        migrations.CreateModel(
            name="IndicatorRow",
            fields=[
                (
                    "pk",
                    models.CompositePrimaryKey(
                        "exchange_id",
                        "symbol",
                        "timeframe",
                        "ts",
                        blank=True,
                        editable=False,
                        primary_key=True,
                        serialize=False,
                    ),
                ),
                ("exchange_id", models.CharField(max_length=64)),
                ("symbol", models.CharField(max_length=64)),
                ("timeframe", models.CharField(max_length=8)),
                ("ts", models.BigIntegerField(help_text="Open time of the candle, UTC milliseconds.")),
                (
                    "columns",
                    models.TextField(blank=True, help_text="Comma-separated column names of the packed values."),
                ),
                ("data", models.BinaryField(help_text="One big-endian float64 per column; NaN is null.")),
            ],
            options={
                "db_table": "marketdata_indicator",
            },
        ),
        migrations.RunPython(pack_json_rows, unpack_to_json_rows, elidable=True),
        migrations.DeleteModel("JsonIndicatorRow"),
    ]
