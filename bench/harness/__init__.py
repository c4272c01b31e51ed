"""What the benchmark scripts share; each module has one job.

* ``procs``: child processes (``flux-proxy`` commands, their environment, start, wait
  until ready, stop; ``PR_SET_PDEATHSIG``), free ports, SIGTERM handling, logs.
* ``cpu``: CPU accounting from ``/proc`` (process trees, the whole machine, "other
  load"), waiting for a quiet machine, what the machine is.
* ``report``: percentiles, millisecond formatting, Markdown tables, JSON output,
  comma-list command-line values.
* ``load``: httpx clients, the closed-loop load generator, JSON answers, polling.
* ``simulators``: the WaveSpeed / VibeDream simulators as child processes (and a
  variant whose ``error_rate`` fails accepted jobs: ``python -m bench.harness.simulators``).
* ``proxy``: the proxy as a child process: its TOML config, start, client keys, a
  PostgreSQL database to run on.
* ``profile``: ``py-spy`` attached to a child process, and a summary of its samples.

Everything listens on and talks to 127.0.0.1 only; every loop is bounded.
"""
