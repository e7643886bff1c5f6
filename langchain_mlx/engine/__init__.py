"""The engine: the only code that runs MLX (one worker thread per loaded model).

`types` (requests, events, errors) imports nothing from the package; `worker`
(the engine and its lifetime), `scheduler` (admission and the decode loop),
`text` (per-request text), `prefix_cache` and `serial` import mlx lazily, so
importing this package does not import mlx.
"""
