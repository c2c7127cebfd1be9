"""SLO planner: profiles, load prediction, pool sizing, connectors and a trace-driven simulator.

Layout:
- `profile`     the profile file format (JSON), validation and interpolation;
- `predictors`  load predictors (constant, moving average, Holt-Winters, Kalman);
- `sla_math`    pure sizing math: TTFT/ITL targets + profile -> pool sizes;
- `config`      `PlannerConfig`; `types` the `Observations` and `Decision` records;
- `core`        `Planner.on_tick(observations) -> Decision`, pure (no I/O);
- `observe`     observations from the frontend's Prometheus `/metrics`;
- `connectors`  apply decisions (dry-run, Kubernetes, local worker processes, Ray actors);
- `simulator`   trace-driven simulation of the two pools with the planner in the loop;
- `loop`        the live loop (observe -> on_tick -> apply) behind `splitserve planner`;
- `cli`, `simulate_cli`, `loop_cli`: `splitserve plan`, `simulate`, `planner`.

Nothing here is imported eagerly: `splitserve --help` stays fast.
"""
