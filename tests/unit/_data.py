"""Small datasets in the RL schema for tests."""


def arith_parquet(path, n):
    """`n` rows 'What is i + 2?' (data_source arithmetic) written to `path`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": "arithmetic", "prompt": [{"role": "user", "content": f"What is {i} + 2?"}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(i + 2)},
             "extra_info": {"split": "test", "index": i}} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
