"""Identity micro-benchmarks (filled in once bench_tokens / bench_ownership / bench_policy land)."""
CASES: list[str] = []


def run(stack, sizes, case, rep):
    raise RuntimeError("no identity micro-benchmarks yet")
