"""Partitions: clinical data by legacy sistema (dynamic), app data by user shard (static)."""

from dagster import DynamicPartitionsDefinition, StaticPartitionsDefinition

sistemas_partitions = DynamicPartitionsDefinition(name="sistemas")

APP_SHARDS = 16
app_shards = StaticPartitionsDefinition([f"shard-{n:02d}" for n in range(APP_SHARDS)])
