"""fedprompt benchmarks:
`python -m benchmarks run [--suite accuracy|recipe|regimes|dp|comm|round|scale|all] [--quick] --out DIR`.

One module per suite (`accuracy`, `recipe`, `regimes`, `dp`, `comm`, `round`, `scale`), each exposing
`run(ctx) -> dict`, `markdown(result) -> str` and `plot(result, out_dir) -> list[str]`. Shared helpers (data,
statistics, environment) live in `benchmarks.common`. Results: `DIR/results.json`,
`DIR/results.md` and PNG plots. See BENCHMARKS.md for the measured figures.
"""

SUITES = ("dp", "comm", "accuracy", "recipe", "regimes", "round", "scale", "late_prompt")
